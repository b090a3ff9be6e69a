"""IP-Adapter files (tencent-ailab/IP-Adapter's `ip-adapter*.bin` / `.safetensors`, as h94/IP-Adapter distributes
them and diffusers, the A1111 ControlNet extension and ComfyUI read them) and the CLIP image encoders they need.

An IP-Adapter file holds two parts (a `.bin` as a dict of two dicts, a `.safetensors` under two key prefixes):
- `image_proj`: base: `proj` (Linear E -> 4*D) and `norm` (LayerNorm D); plus: the Resampler (`latents`, `proj_in`,
  `layers.{i}.0` PerceiverAttention with `norm1`, `norm2`, `to_q`, fused `to_kv`, `to_out`; `layers.{i}.1` feed-forward
  `0` LayerNorm, `1` Linear, `3` Linear; `proj_out`, `norm_out`);
- `ip_adapter`: `{n}.to_k_ip.weight`, `{n}.to_v_ip.weight` for every cross-attention, numbered over all of diffusers'
  attention processors (self- and cross-attention alternate, so n = 1, 3, 5, ...: the i-th cross-attention of
  models/ip_adapter.cross_attentions is n = 2i + 1).

What the tensors cannot show: the Resampler's heads (every released model has 64-wide heads: `heads=` overrides) and
a single-file image encoder's heads and activation (see `infer_clip_vision_config`).
`.bin`/`.pth` pickles are read only through io.py's safe reader (torch.load with weights_only).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..configs import UNetConfig
from ..errors import ArchitectureError, CheckpointError, InvalidInputError
from ..models.clip_vision import CLIPImageEncoder, CLIPVisionConfig
from ..models.ip_adapter import IPAdapter, IPAdapterConfig, check_fits
from .detect import block_indices
from .io import detect_format, read_checkpoint, read_json_object, read_pickle_checkpoint, read_safetensors, weight_dtype
from .keymaps import first_keys, rename_key

PARTS = ("image_proj", "ip_adapter")
HEAD_DIM = 64  # the Resampler's head width in every released IP-Adapter Plus
VISION_WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")
_VISION = "vision_model."
_LAYER_KEY = re.compile(r"(\d+)\.to_([kv])_ip\.weight")

# image_proj tensors of variants sdtorch does not build: (key, what to say)
_UNSUPPORTED = [
    ("perceiver_resampler.proj_in.weight", "an IP-Adapter FaceID Plus (it takes InsightFace embeddings)"),
    ("proj.3.weight", "an IP-Adapter Full Face (an MLP over all 257 image tokens)"),
    ("proj.0.weight", "an IP-Adapter FaceID (it takes InsightFace embeddings)"),
]

_TO_KV = re.compile(r"layers\.(\d+)\.0\.to_kv\.weight")
_SPLIT_KV = re.compile(r"layers\.(\d+)\.attn\.to_([kv])\.weight")


def image_proj_table(config: IPAdapterConfig) -> dict[str, str]:
    """Original module path -> sdtorch's (diffusers') for the image projection (the Resampler's fused `to_kv` aside,
    which `original_to_ip_adapter` splits)."""
    if config.kind == "base":
        return {"proj": "image_embeds", "norm": "norm"}
    table = {name: name for name in ("latents", "proj_in", "proj_out", "norm_out")}
    for i in range(config.depth):
        table.update({
            f"layers.{i}.0.norm1": f"layers.{i}.ln0",  # the image features' LayerNorm
            f"layers.{i}.0.norm2": f"layers.{i}.ln1",  # the latents'
            f"layers.{i}.0.to_q": f"layers.{i}.attn.to_q",
            f"layers.{i}.0.to_out": f"layers.{i}.attn.to_out.0",
            f"layers.{i}.1.0": f"layers.{i}.ff.0",  # feed-forward: LayerNorm, Linear, (GELU), Linear
            f"layers.{i}.1.1": f"layers.{i}.ff.1.net.0.proj",
            f"layers.{i}.1.3": f"layers.{i}.ff.1.net.2",
        })
    return table


@dataclass(frozen=True)
class IPAdapterLoadReport:
    """What loading an IP-Adapter found: the source, its variant and the entries skipped on purpose."""

    source: str
    kind: str  # "base" | "plus"
    ignored_keys: list[str] = field(default_factory=list)


# ---- IP-Adapter -------------------------------------------------------------------------------------------------


def read_ip_adapter_file(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """An IP-Adapter file as (image_proj tensors, ip_adapter tensors, ignored non-tensor entries), floating tensors
    cast to `dtype` (None: as stored). A `.safetensors` file has them under `image_proj.` and `ip_adapter.`; a pickle
    as a dict of the two dicts (or flat, prefixed)."""
    path = Path(path)
    ignored: list[str] = []
    if detect_format(path) == "safetensors":
        flat, _ = read_safetensors(path, dtype)
    else:
        flat = {}
        _flatten(read_pickle_checkpoint(path), "", flat, ignored, path)
        if dtype is not None:
            flat = {k: v.to(dtype) if v.is_floating_point() else v for k, v in flat.items()}
    parts: dict[str, dict[str, Tensor]] = {p: {} for p in PARTS}
    other = []
    for key, tensor in flat.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts and rest:
            parts[prefix][rest] = tensor
        else:
            other.append(key)
    if not parts["image_proj"] or not parts["ip_adapter"]:
        lacking = " and ".join(f"{p}.*" for p in PARTS if not parts[p])
        hint = ""
        if any(k.startswith(("model.diffusion_model.", "control_model.", "lora_")) for k in flat):
            hint = " (it looks like a model, ControlNet or LoRA)"
        raise ArchitectureError(f"{path} is not an IP-Adapter: it has no {lacking} tensors{hint}")
    if other:
        raise ArchitectureError(f"{path}: {len(other)} tensor(s) outside image_proj and ip_adapter: "
                                f"{first_keys(other)}")
    return parts["image_proj"], parts["ip_adapter"], ignored


def _flatten(obj: object, prefix: str, out: dict[str, Tensor], ignored: list[str], path: Path) -> None:
    """Nested dicts of tensors -> {"a.b.c": tensor}; other leaves are listed in `ignored`."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {prefix.rstrip('.') or 'its top level'} is a {type(obj).__name__}, not a "
                              "dictionary of tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: a key {key!r} is not a string; tensor names are strings")
        if isinstance(value, Tensor):
            out[prefix + key] = value
        elif isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out, ignored, path)
        else:
            ignored.append(prefix + key)


def _shape(sd: dict[str, Tensor], key: str, ndim: int, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise ArchitectureError(f"{source}: image_proj lacks {key}")
    shape = tuple(sd[key].shape)
    if len(shape) != ndim:
        raise ArchitectureError(f"{source}: image_proj.{key} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def _layer_dims(ip_layers: dict[str, Tensor], source: str) -> tuple[tuple[int, ...], int]:
    """(each cross-attention's width in the files' order, the image tokens' width) from `{n}.to_k_ip.weight`, with
    n = 1, 3, 5, ... and a to_v_ip of the same shape beside each."""
    found: dict[int, dict[str, tuple[int, ...]]] = {}
    unexpected = []
    for key, tensor in ip_layers.items():
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            unexpected.append(key)
        else:
            found.setdefault(int(match[1]), {})[match[2]] = tuple(tensor.shape)
    if any("lora" in k for k in unexpected):
        raise ArchitectureError(f"{source} is an IP-Adapter FaceID (its layers carry LoRA weights): not supported")
    if unexpected:
        raise ArchitectureError(f"{source}: {len(unexpected)} ip_adapter tensor(s) are not to_k_ip/to_v_ip weights: "
                                f"{first_keys(unexpected)}")
    numbers = sorted(found)
    if numbers != list(range(1, 2 * len(numbers), 2)):
        shown = f"{numbers[:6]}{' ...' if len(numbers) > 6 else ''}"
        raise ArchitectureError(f"{source}: ip_adapter layers are numbered {shown}, not 1, 3, 5, ... (one for each "
                                "cross-attention)")
    dims, widths = [], set()
    for n in numbers:
        k, v = found[n].get("k"), found[n].get("v")
        if k is None or v is None or k != v or len(k) != 2:
            raise ArchitectureError(f"{source}: ip_adapter.{n} needs to_k_ip and to_v_ip weights of one 2-d shape; "
                                    f"got {k} and {v}")
        dims.append(k[0])
        widths.add(k[1])
    if len(widths) != 1:
        raise ArchitectureError(f"{source}: ip_adapter layers take image tokens of several widths {sorted(widths)}")
    return tuple(dims), widths.pop()


def infer_ip_adapter_config(
    image_proj: dict[str, Tensor], ip_layers: dict[str, Tensor], heads: int | None = None,
    source: str = "IP-Adapter",
) -> IPAdapterConfig:
    """The IPAdapterConfig the two parts (original names, or diffusers' for image_proj) describe. `heads`: the
    Resampler's attention heads (default: its attention width / 64, as in every released model)."""
    for key, what in _UNSUPPORTED:
        if key in image_proj:
            raise ArchitectureError(f"{source} is {what}: not supported")
    layer_dims, context = _layer_dims(ip_layers, source)
    if "proj.weight" in image_proj or "image_embeds.weight" in image_proj:
        name = "proj" if "proj.weight" in image_proj else "image_embeds"
        out, embed = _shape(image_proj, f"{name}.weight", 2, source)
        (norm,) = _shape(image_proj, "norm.weight", 1, source)
        if norm != context or out % context:
            raise ArchitectureError(f"{source}: image_proj.{name} makes {out} features and its norm is {norm} wide; "
                                    f"the layers take {context}-wide tokens (want a multiple of it and that width)")
        return IPAdapterConfig("base", embed, context, out // context, layer_dims)
    if "latents" in image_proj:
        _, queries, hidden = _shape(image_proj, "latents", 3, source)
        _, embed = _shape(image_proj, "proj_in.weight", 2, source)
        output, _ = _shape(image_proj, "proj_out.weight", 2, source)
        if output != context:
            raise ArchitectureError(f"{source}: the Resampler makes {output}-wide tokens; the layers take {context}")
        diffusers_names = any(".attn." in k for k in image_proj)
        depth = len(block_indices(image_proj, "layers."))
        if depth < 1:
            raise ArchitectureError(f"{source}: the Resampler has no layers.* blocks")
        q_key, ff_key = (("layers.0.attn.to_q.weight", "layers.0.ff.1.net.0.proj.weight") if diffusers_names
                         else ("layers.0.0.to_q.weight", "layers.0.1.1.weight"))
        inner, _ = _shape(image_proj, q_key, 2, source)
        ff_dim, _ = _shape(image_proj, ff_key, 2, source)
        if heads is None:
            if inner % HEAD_DIM:
                raise ArchitectureError(f"{source}: the Resampler's attention is {inner} wide, not a multiple of "
                                        f"{HEAD_DIM}: pass heads= (its attention heads)")
            heads = inner // HEAD_DIM
        if not isinstance(heads, int) or heads < 1 or inner % heads:
            raise InvalidInputError(f"heads must be a positive integer dividing the attention width {inner}, "
                                    f"not {heads!r}")
        return IPAdapterConfig("plus", embed, context, queries, layer_dims, hidden_dim=hidden, depth=depth,
                               heads=heads, head_dim=inner // heads, ff_dim=ff_dim)
    raise ArchitectureError(f"{source}: image_proj is neither IP-Adapter's projection (proj, norm) nor the Plus "
                            f"Resampler (latents, proj_in, layers, ...): {first_keys(sorted(image_proj))}")


def original_to_ip_adapter(
    image_proj: dict[str, Tensor], ip_layers: dict[str, Tensor], config: IPAdapterConfig
) -> dict[str, Tensor]:
    """The two parts in sdtorch's (diffusers') names: `image_proj.*` and `layers.{i}.to_k_ip/to_v_ip.weight`
    (image_proj may be in diffusers' names already). A key that fits no rule is an ArchitectureError (missing ones
    are left for the strict load to report)."""
    out: dict[str, Tensor] = {}
    for key, tensor in ip_layers.items():
        match = _LAYER_KEY.fullmatch(key)
        out[f"layers.{(int(match[1]) - 1) // 2}.to_{match[2]}_ip.weight"] = tensor
    table = image_proj_table(config)
    table.update({ours: ours for ours in list(table.values())})  # diffusers' names pass through
    unexpected = []
    for key, tensor in image_proj.items():
        kv = _TO_KV.fullmatch(key) if config.kind == "plus" else None
        if kv is not None:  # the fused to_kv (2*inner, hidden): keys first, then values
            k, v = tensor.chunk(2, dim=0)
            out[f"image_proj.layers.{kv[1]}.attn.to_k.weight"] = k
            out[f"image_proj.layers.{kv[1]}.attn.to_v.weight"] = v
            continue
        if _SPLIT_KV.fullmatch(key) is not None and config.kind == "plus":
            out[f"image_proj.{key}"] = tensor
            continue
        name = rename_key(key, table)
        if name is None:
            unexpected.append(key)
        else:
            out[f"image_proj.{name}"] = tensor
    if unexpected:
        raise ArchitectureError(f"{len(unexpected)} image_proj tensor(s) fit no part of an IP-Adapter "
                                f"{config.kind} projection: {first_keys(unexpected)}")
    return out


def ip_adapter_to_original(sd: dict[str, Tensor], config: IPAdapterConfig) -> dict[str, dict[str, Tensor]]:
    """The exact inverse of `original_to_ip_adapter`: {"image_proj": {...}, "ip_adapter": {...}} in the original
    names (what `torch.save` writes as a `.bin`; a `.safetensors` has each part's keys under its name)."""
    inverse = {ours: original for original, ours in image_proj_table(config).items()}
    image_proj: dict[str, Tensor] = {}
    ip_layers: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        layer = re.fullmatch(r"layers\.(\d+)\.to_([kv])_ip\.weight", key)
        name = key.removeprefix("image_proj.")
        kv = _SPLIT_KV.fullmatch(name)
        if layer is not None:
            ip_layers[f"{2 * int(layer[1]) + 1}.to_{layer[2]}_ip.weight"] = tensor
        elif kv is not None:
            if kv[2] == "k":  # fuse with its values
                value = sd[f"image_proj.layers.{kv[1]}.attn.to_v.weight"]
                image_proj[f"layers.{kv[1]}.0.to_kv.weight"] = torch.cat([tensor, value], dim=0)
        elif name != key and rename_key(name, inverse) is not None:
            image_proj[rename_key(name, inverse)] = tensor
        else:
            raise ArchitectureError(f"{key} has no name in the original IP-Adapter layout")
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def load_ip_adapter(
    source: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
    unet: nn.Module | UNetConfig | None = None, heads: int | None = None, scale: float = 1.0,
) -> IPAdapter:
    """Load an IP-Adapter file (`ip-adapter*_sd15`, `_sdxl`, plus, plus-face; `.bin`/`.pth` or `.safetensors`).

    dtype: weight dtype (default float32), cast while reading. device: where it lives (default CPU).
    unet: the UNet (or its config) it will be installed in, checked against (layer count and widths, context).
    heads: the Plus Resampler's attention heads (default: width / 64, as every released model has).
    scale: its initial `scale`. Install it with models.ip_adapter.install_ip_adapter.
    The returned adapter is in eval mode without gradients; `adapter.load_report` says what was read and skipped.
    """
    from .loading import build_model  # loading.py imports the pipeline, which may import this module

    dtype = weight_dtype(dtype)
    path = Path(source).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "no such file"
        raise CheckpointError(f"{source}: {what}; an IP-Adapter is one file (ip-adapter*.bin or .safetensors)")
    image_proj, ip_layers, ignored = read_ip_adapter_file(path, dtype)
    config = infer_ip_adapter_config(image_proj, ip_layers, heads, str(source))
    tensors = original_to_ip_adapter(image_proj, ip_layers, config)
    if unet is not None:
        _check_against(config, unet, str(source))
    adapter = build_model(IPAdapter, config, tensors, "IP-Adapter", dtype, device, source=str(source))
    adapter.scale = scale
    adapter.load_report = IPAdapterLoadReport(str(source), config.kind, ignored)
    return adapter


def _check_against(config: IPAdapterConfig, unet: nn.Module | UNetConfig, source: str) -> None:
    if isinstance(unet, UNetConfig):
        from ..models.unet import UNet

        with torch.device("meta"):
            unet = UNet(unet)
    with torch.device("meta"):
        adapter = IPAdapter(config)
    check_fits(adapter, unet, source)


# ---- CLIP image encoder -----------------------------------------------------------------------------------------


def infer_clip_vision_config(sd: dict[str, Tensor], source: str = "CLIP image encoder") -> CLIPVisionConfig:
    """The CLIPVisionConfig a transformers-layout state dict describes. Not in the tensors: the heads (16 for the
    1024-, 1280- and 1664-wide towers, OpenAI ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14; else width / 64) and the
    activation (QuickGELU up to width 1024, OpenAI's towers; GELU above, OpenCLIP's), as ComfyUI's configs have
    them. Pass `config=` to `load_clip_vision` for other towers."""
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        full = _VISION + key
        if full not in sd or sd[full].ndim != ndim:
            raise ArchitectureError(f"{source}: lacks {full} (a {ndim}-d tensor)")
        return tuple(sd[full].shape)

    (width,) = shape("embeddings.class_embedding", 1)
    _, channels, patch, _ = shape("embeddings.patch_embedding.weight", 4)
    positions, _ = shape("embeddings.position_embedding.weight", 2)
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise ArchitectureError(f"{source}: {positions} position embeddings are not a class token and a square grid")
    layers = block_indices(sd, _VISION + "encoder.layers.")
    if layers != list(range(len(layers))) or not layers:
        raise ArchitectureError(f"{source}: encoder layers {layers[:5]} are not numbered 0, 1, 2, ...")
    mlp, _ = shape("encoder.layers.0.mlp.fc1.weight", 2)
    if "visual_projection.weight" not in sd:
        raise ArchitectureError(f"{source}: lacks visual_projection.weight (a CLIPVisionModel without the "
                                "projection; IP-Adapter needs CLIPVisionModelWithProjection's)")
    projection = sd["visual_projection.weight"].shape[0]
    heads = 16 if width in (1024, 1280, 1664) else max(1, width // 64)
    if width % heads:
        raise ArchitectureError(f"{source}: cannot tell the heads of a {width}-wide tower; pass config=")
    return CLIPVisionConfig(width=width, num_layers=len(layers), num_heads=heads, mlp_width=mlp,
                            projection_dim=projection, image_size=side * patch, patch_size=patch,
                            num_channels=channels, activation="quick_gelu" if width <= 1024 else "gelu")


def _vision_tensors(sd: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], list[str]]:
    """The image encoder's tensors of a transformers-layout file and the keys skipped on purpose: position_ids (a
    buffer older transformers saved) and a whole CLIPModel's text tower, projection and logit_scale."""
    if not any(k.startswith(_VISION) for k in sd):
        if any(k.startswith(("visual.", "transformer.resblocks.")) or ".visual." in k for k in sd):
            raise ArchitectureError(f"{source} is an OpenCLIP-layout model: not supported; use a transformers-layout "
                                    "image encoder (h94/IP-Adapter's models/image_encoder, ComfyUI's clip_vision "
                                    "files)")
        raise ArchitectureError(f"{source} holds no CLIP image encoder (no {_VISION}* tensors)")
    skip = ("text_model.", "text_projection.", "logit_scale", _VISION + "embeddings.position_ids")
    ignored = [k for k in sd if k.startswith(skip)]
    return {k: v for k, v in sd.items() if not k.startswith(skip)}, ignored


def load_clip_vision(
    source: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
    config: CLIPVisionConfig | None = None,
) -> CLIPImageEncoder:
    """Load a CLIP image encoder strictly: a transformers folder (config.json and model.safetensors or
    pytorch_model.bin; h94/IP-Adapter's `models/image_encoder`, `sdxl_models/image_encoder`) or a single file in
    transformers' key layout (ComfyUI's `clip_vision` files, the A1111 ControlNet extension's `clip_h.pth`, ...).

    dtype: weight dtype (default float32). config: the architecture (a single file's is read from its tensors,
    see `infer_clip_vision_config`). `model.load_report` lists the tensors skipped on purpose.
    """
    from .loading import build_model

    dtype = weight_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_dir():
        folder_config, weights = _vision_folder(path)
        config = config or folder_config
        tensors, _ = read_checkpoint(weights, dtype)
    elif path.is_file():
        tensors, _ = read_checkpoint(path, dtype)
    else:
        raise CheckpointError(f"no such CLIP image encoder file or folder: {source}")
    tensors, ignored = _vision_tensors(tensors, str(source))
    config = config or infer_clip_vision_config(tensors, str(source))
    model = build_model(CLIPImageEncoder, config, tensors, "CLIP image encoder", dtype, device, source=str(source))
    model.load_report = ignored
    return model


def _vision_folder(folder: Path) -> tuple[CLIPVisionConfig, Path]:
    config_file = folder / "config.json"
    cfg = read_json_object(config_file, f"{folder} is a folder but not a transformers image encoder: no config.json")
    model_type = cfg.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise ArchitectureError(f"{config_file}: a {model_type!r} model, not a CLIP image encoder")
    config = CLIPVisionConfig.from_transformers(cfg, source=str(config_file))
    for name in VISION_WEIGHT_FILES:
        if (folder / name).is_file():
            return config, folder / name
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(VISION_WEIGHT_FILES)})")
