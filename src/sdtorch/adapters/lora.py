"""LoRA files users trade (kohya / A1111 and diffusers / peft), applied to the UNet and the text encoder.

A LoRA adds a low-rank update to chosen layers: W' = W + scale * (alpha / rank) * up @ down (Hu et al. 2021,
eq. 3), with down (rank, in) and up (out, rank); for a convolution (LoCon) down is a conv with the layer's
kernel, stride and padding and up a 1x1 conv. alpha defaults to rank when the file has none.

Formats, told apart per key (never by file name):
- kohya / A1111: `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`, `.alpha` and `lora_te_<path>...`, where
  <path> is the module path with `_` for `.`: the diffusers path (`down_blocks_0_attentions_0_..._to_q`) or
  the original ldm one (`input_blocks_1_1_..._to_q`, as kohya writes SDXL's: it trains SDXL on the original
  UNet), the text encoder's as in transformers (`text_model_...`).
- diffusers / peft: `unet.<path>.lora_A.weight` / `.lora_B.weight` and `text_encoder.text_model.<path>...`, the
  older `.lora.down.weight`, `.lora_linear_layer.down.weight` and `...processor.to_q_lora.down.weight` forms;
  alpha from `.alpha` keys or diffusers' `lora_adapter_metadata` (lora_alpha, alpha_pattern, use_rslora).
The text encoders each format names (`TextEncoderSlot`): SD1 / SD2 `lora_te_` and `text_encoder.`; SDXL base
`lora_te1_` / `text_encoder.` (CLIP ViT-L) and `lora_te2_` / `text_encoder_2.` (OpenCLIP bigG); the SDXL refiner's
only encoder (bigG) `lora_te_` (kohya's prefix for a model with one text encoder), `lora_te2_` and
`text_encoder_2.` (diffusers' refiner pipeline holds it as text_encoder_2) and `text_encoder.`.
Refused with an error that names the key: SDXL files on SD1 / SD2 models, LyCORIS' LoHa / LoKr /
Tucker (`hada_`, `lokr_`, `lora_mid`), DoRA (`dora_scale`, `lora_magnitude_vector`), LoRA biases, and any
key for a layer the model does not have or with a shape that does not fit it.

Applied at run time, never merged: each targeted nn.Linear / nn.Conv2d (or int8-quantised Linear) gets one
forward hook that adds sum_i scale_i * (alpha_i / rank_i) * up_i(down_i(x)) to its output, in the layer's dtype
(as peft does). The weights are never touched, so unloading restores the outputs bit for bit, scales change
without reloading, and any number of LoRAs stack. The cost is two rank-r products per targeted layer and step:
about r * (in + out) / (in * out) of the layer's FLOPs (a few percent at rank <= 32 on SD1) plus the hook calls.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checkpoints.io import describe_error, detect_format, file_sha256, read_checkpoint, read_safetensors_header
from ..checkpoints.keymaps import rename_key, unet_table
from ..errors import CheckpointError, InvalidInputError
from ..quantization import Int8Linear

COMPONENTS = ("unet", "text_encoder")  # the model parts a LoRA changes: the keys of `models`
DIFFUSERS_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_FILE_COMPONENTS = ("unet", "text_encoder_2", "text_encoder")  # diffusers' key prefixes (the longer one first)
_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # old attention processors: `...processor.to_q_lora.down`
    ".alpha": "alpha",
}
# the old processor keys name the attention's projections by diffusers' attention-processor names
_OLD_PROJECTIONS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_SDXL = ("lora_te1_", "lora_te2_", "text_encoder_2.")  # keys only SDXL files have
_UNSUPPORTED = {  # substring of a key -> what it is
    "hada_": "a LyCORIS LoHa", "lokr_": "a LyCORIS LoKr", "lora_mid": "a LyCORIS LoCon with Tucker decomposition",
    "dora_scale": "a DoRA", "lora_magnitude_vector": "a DoRA",
}
_HEX = re.compile(r"[0-9a-fA-F]{12,64}")


@dataclass
class LoraLayer:
    """One layer's low-rank pair, already in the layer's layout, dtype and device.

    Linear: down (rank, in), up (out, rank). Conv2d: down (rank, in, kh, kw), up (out, rank, 1, 1).
    factor: alpha / rank (alpha / sqrt(rank) for rank-stabilised LoRA).
    """

    down: Tensor
    up: Tensor
    factor: float


@dataclass
class LoadedLora:
    """A loaded LoRA: its scale and the layers it changes ((model part, module path) -> pair)."""

    scale: float
    layers: dict[tuple[str, str], LoraLayer]
    source: Path


class _LayerHook:
    """Forward hook of one layer: output + sum over the layer's LoRAs of scale * factor * up(down(x))."""

    def __init__(self, layer: nn.Linear | Int8Linear | nn.Conv2d):
        self.entries: dict[str, tuple[LoadedLora, LoraLayer]] = {}  # LoRA name -> (its record, this layer's pair)
        self.handle: RemovableHandle = layer.register_forward_hook(self)

    def __call__(self, layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = args[0]  # Linear: (..., in); Conv2d: (B, in, H, W)
        for lora, pair in self.entries.values():
            if lora.scale == 0:
                continue
            if pair.down.device != output.device or pair.down.dtype != output.dtype:  # the model moved since loading
                pair.down, pair.up = pair.down.to(output), pair.up.to(output)
            if isinstance(layer, nn.Conv2d):
                h = F.conv2d(x, pair.down, None, layer.stride, layer.padding, layer.dilation)  # (B, rank, H', W')
                h = F.conv2d(h, pair.up)  # (B, out, H', W')
            else:
                h = F.linear(F.linear(x, pair.down), pair.up)  # (..., rank) -> (..., out)
            output = output + h * (lora.scale * pair.factor)
        return output


@dataclass
class LoraAdapters:
    """The LoRAs applied to one pipeline's models, by name; see the module docstring for how."""

    loaded: dict[str, LoadedLora] = field(default_factory=dict)
    _hooks: dict[nn.Module, _LayerHook] = field(default_factory=dict, repr=False)  # one per targeted layer

    @property
    def scales(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs, in loading order."""
        return {name: lora.scale for name, lora in self.loaded.items()}

    def load(
        self, source: str | Path, models: Mapping[str, nn.Module], scale: float = 1.0, name: str | None = None
    ) -> str:
        """Read a LoRA file (or a diffusers folder holding pytorch_lora_weights.safetensors), apply it; return its name.

        models: {"unet": UNet, "text_encoder": CLIPTextEncoder or SDXLTextEncoder}. name defaults to the file stem
        (folder name).
        """
        path = resolve_lora_path(source)
        name = (Path(source).name if path != Path(source) else path.stem) if name is None else name
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"a LoRA name must be a non-empty string, got {name!r}")
        if name in self.loaded:
            raise InvalidInputError(f"a LoRA named {name!r} is already loaded: unload it first or pass another name")
        scale = _check_scale(scale)
        tensors, metadata = read_checkpoint(path)
        layers = parse_lora(tensors, metadata, models, where=str(path))
        lora = LoadedLora(scale, layers, path)
        for (part, module_path), pair in layers.items():
            layer = models[part].get_submodule(module_path)
            hook = self._hooks.get(layer)
            if hook is None:
                hook = self._hooks[layer] = _LayerHook(layer)
            hook.entries[name] = (lora, pair)
        self.loaded[name] = lora
        return name

    def unload(self, name: str | None = None) -> None:
        """Remove one LoRA (None: all); the layers it changed compute exactly what they did before."""
        if name is not None:
            self._get(name)  # an unknown name is an error
        for n in list(self.loaded) if name is None else [name]:
            del self.loaded[n]
            for layer, hook in list(self._hooks.items()):
                hook.entries.pop(n, None)
                if not hook.entries:
                    hook.handle.remove()
                    del self._hooks[layer]

    def set_scale(self, name: str, scale: float) -> None:
        self._get(name).scale = _check_scale(scale)

    def _get(self, name: str) -> LoadedLora:
        if name not in self.loaded:
            known = ", ".join(self.loaded) or "none"
            raise InvalidInputError(f"no LoRA named {name!r} is loaded (loaded: {known})")
        return self.loaded[name]


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def resolve_lora_path(source: str | Path) -> Path:
    """The LoRA file itself, or in a diffusers folder its pytorch_lora_weights.safetensors (or .bin)."""
    path = Path(source)
    if path.is_dir():
        for weight_name in DIFFUSERS_WEIGHT_NAMES:
            if (path / weight_name).is_file():
                return path / weight_name
        raise CheckpointError(f"{path} is a folder without {' or '.join(DIFFUSERS_WEIGHT_NAMES)}: not a LoRA")
    if not path.exists():
        raise CheckpointError(f"LoRA file {path} does not exist")
    return path


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash for the infotext's `Lora hashes: name: hash`: 12 hex digits.

    As A1111's NetworkOnDisk: the kohya hash a safetensors file records in its metadata (`sshs_model_hash`),
    else the sha256 of its tensor data (everything after the header, sd-scripts' `addnet_hash_safetensors`);
    for a pickle (.pt/.ckpt) the sha256 of the whole file.
    """
    path = resolve_lora_path(path)
    start = 0
    if detect_format(path) == "safetensors":
        _, metadata, start = read_safetensors_header(path)
        recorded = metadata.get("sshs_model_hash", "")
        if _HEX.fullmatch(recorded):
            return recorded[:12]
    return file_sha256(path, start)[:12]


# ---- reading the keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderSlot:
    """One CLIP encoder of `models["text_encoder"]` and the names LoRA files give it.

    kohya: the layer-name prefixes (`lora_te_`, ...); diffusers: the key prefixes (`text_encoder`, ...);
    path: the encoder's module path inside `models["text_encoder"]` with a trailing dot ("" for SD1 / SD2's CLIP).
    """

    kohya: tuple[str, ...]
    diffusers: tuple[str, ...]
    path: str


def text_encoder_slots(text_encoder: nn.Module) -> list[TextEncoderSlot]:
    """The CLIP encoders of an SD1 / SD2 `CLIPTextEncoder` or an SDXL `SDXLTextEncoder` (`encoders`: base
    ViT-L then bigG; refiner bigG alone) with the prefixes each LoRA format gives them (module docstring)."""
    encoders = getattr(text_encoder, "encoders", None)
    if encoders is None:
        return [TextEncoderSlot(("lora_te_",), ("text_encoder",), "")]
    if len(encoders) == 1:  # kohya names a lone text encoder lora_te_; diffusers' refiner calls it text_encoder_2
        return [TextEncoderSlot(("lora_te_", "lora_te2_"), ("text_encoder", "text_encoder_2"), "encoders.0.")]
    return [TextEncoderSlot((f"lora_te{i + 1}_",), ("text_encoder" if i == 0 else f"text_encoder_{i + 1}",),
                            f"encoders.{i}.") for i in range(len(encoders))]


def _is_sdxl(models: Mapping[str, nn.Module]) -> bool:
    return hasattr(models["text_encoder"], "encoders")


def kohya_names(models: Mapping[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """{kohya layer name: (model part, module path)} for every Linear and Conv2d a LoRA may target.

    UNet layers answer to their diffusers path and their original ldm path (`lora_unet_input_blocks_1_1_...`);
    text-encoder layers to transformers' path under each prefix of their encoder
    (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`; SDXL `lora_te1_...`, `lora_te2_...`;
    bigG's projection `lora_te2_text_projection`).
    """
    names: dict[str, tuple[str, str]] = {}
    original = {ours: theirs for theirs, ours in unet_table(models["unet"].config).items()}
    for path in _lora_targets(models["unet"]):
        names["lora_unet_" + path.replace(".", "_")] = ("unet", path)
        ldm = rename_key(path, original)
        if ldm is not None:
            names["lora_unet_" + ldm.replace(".", "_")] = ("unet", path)
    text_encoder = models["text_encoder"]
    for slot in text_encoder_slots(text_encoder):
        encoder = text_encoder.get_submodule(slot.path[:-1]) if slot.path else text_encoder
        for path in _lora_targets(encoder):
            hf_path = path if path.startswith("text_projection") else "text_model." + path  # transformers' names
            for prefix in slot.kohya:
                names[prefix + hf_path.replace(".", "_")] = ("text_encoder", slot.path + path)
    return names


def kohya_name(text_encoder: nn.Module, part: str, path: str) -> str:
    """The kohya layer name a file written for this model gives (part, module path): the UNet's by its diffusers
    path (`lora_unet_down_blocks_...`), a text encoder's by its first prefix (`lora_te_`, SDXL `lora_te1_` /
    `lora_te2_`) and transformers' path. `kohya_names` reads it back."""
    if part == "unet":
        return "lora_unet_" + path.replace(".", "_")
    for slot in text_encoder_slots(text_encoder):
        if path.startswith(slot.path):
            inner = path[len(slot.path):]
            hf_path = inner if inner.startswith("text_projection") else "text_model." + inner
            return slot.kohya[0] + hf_path.replace(".", "_")
    raise InvalidInputError(f"{path!r} is in none of the text encoders")


def _lora_targets(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear, nn.Conv2d))]


def _unsupported(key: str, sdxl: bool) -> str | None:
    if not sdxl and key.startswith(_SDXL):
        return "an SDXL LoRA (this is an SD1 / SD2 model)"
    return next((what for part, what in _UNSUPPORTED.items() if part in key), None)


def _split_kohya(key: str) -> tuple[str, str] | None:
    """`lora_unet_<name>.<suffix>` -> (layer name, "down" | "up" | "alpha"); None when the key is not of that form."""
    layer, _, suffix = key.partition(".")
    if not layer.startswith(_KOHYA_PREFIXES) or suffix not in _KOHYA_SUFFIXES:
        return None
    return layer, _KOHYA_SUFFIXES[suffix]


def _split_diffusers(key: str) -> tuple[str, str, str] | None:
    """`unet.<path>.lora_A.weight` (or an older form) -> (the file's component: "unet", "text_encoder" or
    "text_encoder_2", path as the file names it, part)."""
    suffix = next((s for s in _DIFFUSERS_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None
    stem = key[: -len(suffix)]
    component = next((p for p in _FILE_COMPONENTS if stem.startswith(p + ".")), None)
    if component is None:
        if ".processor." not in stem:  # diffusers' oldest files: UNet attention processors without a prefix
            return None
        component, stem = "unet", "unet." + stem
    path = stem[len(component) + 1:].replace(".processor.", ".")
    if suffix.startswith("_lora."):
        projections = _OLD_PROJECTIONS["unet" if component == "unet" else "text_encoder"]
        head, _, projection = path.rpartition(".")
        if projection not in projections:
            return None
        path = f"{head}.{projections[projection]}"
    return component, path, _DIFFUSERS_SUFFIXES[suffix]


def _peft_config(metadata: Mapping[str, str], where: str) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` (peft LoraConfig fields under "unet." / "text_encoder." /
    "text_encoder_2.") by the file's component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{where}: lora_adapter_metadata is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: lora_adapter_metadata is not a JSON object")
    by_part: dict[str, dict] = {}
    for key, value in config.items():
        part, _, field_name = key.partition(".")
        by_part.setdefault(part, {})[field_name] = value
    for part, fields in by_part.items():
        if fields.get("use_dora"):
            raise CheckpointError(f"{where}: {part} is a DoRA adapter (use_dora), which sdtorch does not load")
    return by_part


def _peft_alpha(fields: dict, module: str, where: str) -> float | None:
    """The lora_alpha peft gives `module`: the first alpha_pattern key matching its path's end, else lora_alpha."""
    try:
        for pattern, value in dict(fields.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return _finite(value)
        return None if fields.get("lora_alpha") is None else _finite(fields["lora_alpha"])
    except (TypeError, ValueError, re.error) as e:
        raise CheckpointError(f"{where}: malformed lora_adapter_metadata ({describe_error(e)})") from None


def _finite(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]  # a TypeError / ValueError is reported by the caller
    if not math.isfinite(number):
        raise ValueError(f"alpha {value!r} is not finite")
    return number


def parse_lora(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], models: Mapping[str, nn.Module], where: str = "LoRA"
) -> dict[tuple[str, str], LoraLayer]:
    """The layers a LoRA state dict changes: {(model part, module path): pair}, checked against `models`.

    Every key must be understood and name a layer the models have, with shapes that fit it; otherwise a
    CheckpointError names the offending keys.
    """
    kohya = kohya_names(models)
    sdxl = _is_sdxl(models)
    targets = {part: set(_lora_targets(models[part])) for part in COMPONENTS}
    encoders = {component: slot.path for slot in text_encoder_slots(models["text_encoder"])
                for component in slot.diffusers}  # diffusers' component -> module path prefix
    groups: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}  # target -> "down"/"up"/"alpha" -> (key, tensor)
    file_paths: dict[tuple[str, str], tuple[str, str]] = {}  # target -> (component, path) as the file names it
    bad: list[str] = []
    hints: set[str] = set()  # what the keys naming no layer suggest
    for key, tensor in tensors.items():
        if (why := _unsupported(key, sdxl)) is not None:
            raise CheckpointError(f"{where}: {key!r} belongs to {why}; only plain LoRA and LoCon files load")
        if (split := _split_kohya(key)) is not None:
            file_path, part = split
            target = kohya.get(file_path)
            component = "unet" if file_path.startswith("lora_unet_") else "text_encoder"
        elif (split := _split_diffusers(key)) is not None:
            component, file_path, part = split
            if component == "unet":
                target = ("unet", file_path) if file_path in targets["unet"] else None
            else:
                prefix = encoders.get(component)
                path = None if prefix is None else prefix + file_path.removeprefix("text_model.")
                target = ("text_encoder", path) if path in targets["text_encoder"] else None
        else:
            bad.append(f"{key!r} (not a LoRA tensor name sdtorch knows)")
            continue
        if target is None:
            bad.append(f"{key!r} (the model has no such Linear or Conv2d layer)")
            hints.add(_hint(key, models))
            continue
        group = groups.setdefault(target, {})
        if part in group:
            raise CheckpointError(f"{where}: {group[part][0]!r} and {key!r} name the same layer")
        group[part] = (key, tensor)
        file_paths[target] = (component, file_path)
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} key(s) not understood: " + "; ".join(bad[:10]) + "".join(
                f"; {hint}" for hint in sorted(hints))
        )
    if not groups:
        raise CheckpointError(f"{where} holds no LoRA tensors")
    peft = _peft_config(metadata, where)
    layers = {}
    for (part, path), pair in groups.items():
        component, file_path = file_paths[part, path]
        fields = peft.get(component, {})
        default_alpha = _peft_alpha(fields, file_path, where)
        layer = models[part].get_submodule(path)
        layers[part, path] = _lora_layer(layer, pair, default_alpha, bool(fields.get("use_rslora")), where)
    return layers


def _hint(key: str, models: Mapping[str, nn.Module]) -> str:
    """Why a key names no layer, as far as its prefix tells: the text encoders the model has, or another model."""
    slots = text_encoder_slots(models["text_encoder"])
    if key.startswith(("lora_te", "text_encoder")) and not any(
        key.startswith(slot.kohya) or key.startswith(tuple(c + "." for c in slot.diffusers)) for slot in slots
    ):
        names = "; ".join(" / ".join([*slot.kohya, *slot.diffusers]) for slot in slots)
        return f"this model's text encoders are named {names} (a LoRA for another architecture?)"
    return "a LoRA for another architecture?"


def _lora_layer(
    layer: nn.Module, tensors: dict[str, tuple[str, Tensor]], default_alpha: float | None, rslora: bool, where: str
) -> LoraLayer:
    """Check one layer's down / up (/ alpha) against the layer, bring them to its layout, dtype and device."""
    named = next(iter(tensors.values()))[0]
    for needed in ("down", "up"):
        if needed not in tensors:
            raise CheckpointError(f"{where}: {named!r} has no matching {needed} weight")
    (down_key, down), (up_key, up) = tensors["down"], tensors["up"]
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise CheckpointError(f"{where}: {down_key!r} targets a grouped or non-zero-padded conv")
        if layer.kernel_size == (1, 1) and down.ndim == 2:  # a Linear LoRA on a 1x1 conv (SD1's proj_in)
            down = down[:, :, None, None]  # (rank, in) -> (rank, in, 1, 1)
        if up.ndim == 2:
            up = up[:, :, None, None]  # (out, rank) -> (out, rank, 1, 1)
        rank = down.shape[0] if down.ndim else 0
        want_down, want_up = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    else:
        if down.ndim == 4 and down.shape[2:] == (1, 1):  # a 1x1-conv LoRA on a Linear (SD2's proj_in)
            down = down.flatten(1)  # (rank, in, 1, 1) -> (rank, in)
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up.flatten(1)  # (out, rank, 1, 1) -> (out, rank)
        rank = down.shape[0] if down.ndim else 0
        want_down, want_up = (rank, layer.in_features), (layer.out_features, rank)
    for key, tensor, want in ((down_key, down, want_down), (up_key, up, want_up)):
        if tuple(tensor.shape) != want or rank == 0 or not tensor.is_floating_point():
            raise CheckpointError(
                f"{where}: {key!r} has shape {tuple(tensor.shape)} ({tensor.dtype}); the layer needs {want}: "
                "a LoRA for another model (SD1, SD2 or SDXL?)"
            )
    alpha = float(rank) if default_alpha is None else default_alpha
    if "alpha" in tensors:
        alpha_key, alpha_tensor = tensors["alpha"]
        if alpha_tensor.numel() != 1 or not torch.isfinite(alpha_tensor.float()).all():
            shape = tuple(alpha_tensor.shape)
            raise CheckpointError(f"{where}: {alpha_key!r} must be one finite number, got shape {shape}")
        alpha = float(alpha_tensor.float().item())
    factor = alpha / (math.sqrt(rank) if rslora else rank)
    like = layer.weight_scale if isinstance(layer, Int8Linear) else layer.weight  # the hook casts to its output later
    return LoraLayer(down.to(like, copy=True), up.to(like, copy=True), factor)


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


def lora_files(folder: str | Path) -> dict[str, Path]:
    """{name: file} of the LoRA files under `folder` (A1111's `--lora-dir`), a file's name being its stem.

    Prompt tags (`<lora:name>`) are matched against this listing, never joined into a path, so a name cannot
    reach outside the folder. Two files with one stem: the first in sorted path order wins, as A1111 lists them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"LoRA folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in LORA_SUFFIXES and path.is_file():
            found.setdefault(path.stem, path)
    return found
