"""Key mapping between the original single-file layout (CompVis / Stability) and sdtorch's names.

sdtorch names its parameters as diffusers (UNet, VAE) and transformers 5 (`CLIPTextModel`, without
the `text_model.` prefix) do. Each model part gets one rename table, built from its config by a few
rules: `{original module path: sdtorch module path}`. A key is renamed by the longest dotted prefix
found in the table; the rest of the key is kept. Two tensors change shape on the way:
- VAE mid-block attention `q, k, v, proj_out` are 1x1 convs `[C, C, 1, 1]` in the original and
  Linear `[C, C]` in sdtorch;
- OpenCLIP (SD2, SDXL's bigG) fuses q, k, v into `attn.in_proj_weight` `[3C, C]`; sdtorch keeps them apart.
And one is transposed: OpenCLIP's `text_projection` `[width, projection]` is used as `x @ text_projection`;
sdtorch's (and transformers') `text_projection.weight` is a bias-free Linear `[projection, width]`.

SDXL's text encoders are its conditioner's embedders, in the order their outputs are concatenated: the base
has OpenAI CLIP ViT-L (`conditioner.embedders.0.transformer.text_model.`, already transformers' layout) and
OpenCLIP ViT-bigG (`conditioner.embedders.1.model.`, OpenCLIP's layout, with its projection), the refiner
bigG alone (`conditioner.embedders.0.model.`). sdtorch keeps them in one `SDXLTextEncoder` whose keys are
`encoders.{i}.<transformers' name>`. Each text encoder is one "section": (original prefix, sdtorch prefix,
rename table), so SD1, SD2 and SDXL share the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..configs import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import ArchitectureError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model."}
# SDXL's text encoders: embedder i in transformers' layout (OpenAI CLIP) or in OpenCLIP's (bigG)
SDXL_CLIP_PREFIX = "conditioner.embedders.{}.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.{}.model."
V_PRED_KEY = "v_pred"  # an empty marker tensor A1111 / ComfyUI read as "this model predicts v"

# Tensors a single file may carry that sdtorch does not keep: CLIP position ids, the DDPM schedule
# buffers (sdtorch recomputes the schedule), EMA copies (names without dots), OpenCLIP's
# contrastive head and vision tower (SD2's projection too: SD2 conditions on hidden states only),
# the v-prediction markers (read by detect.py) and, in SDXL files, the contrastive scale and a
# projection of CLIP ViT-L that SDXL never uses (ComfyUI's saves may carry one).
_IGNORED = re.compile(
    r"(^|\.)position_ids$"
    r"|^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_\w+|posterior_\w+)$"
    r"|^model_ema\."
    r"|^(v_pred|ztsnr)$"
    r"|^cond_stage_model\.model\.(logit_scale$|text_projection$|visual\.)"
    r"|^conditioner\.embedders\.\d+\.model\.(logit_scale$|visual\.)"
    r"|^conditioner\.embedders\.\d+\.transformer\.(logit_scale|text_projection\.weight)$"
)
_OPENCLIP_BLOCK = re.compile(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.")

# Inner names of blocks that differ between the layouts: {original: sdtorch}.
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "attn": "self_attn", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2"}

_VAE_ATTENTION_WEIGHT = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_FUSED_QKV = re.compile(r"^(.*\.attn)\.in_proj_(weight|bias)$")
_SPLIT_QKV = re.compile(r"^(.*\.attn)\.([qkv])_proj\.(weight|bias)$")


def _block(table: dict[str, str], original: str, ours: str, inner: dict[str, str]) -> None:
    """Add the renames of one block whose children are renamed by `inner`."""
    for a, b in inner.items():
        table[f"{original}.{a}"] = f"{ours}.{b}"


def unet_table(cfg: UNetConfig) -> dict[str, str]:
    """UNet: original `input_blocks`/`middle_block`/`output_blocks` -> diffusers-style block paths (SD1, SD2 and
    SDXL: levels without attention, any transformer depth, the addition embedding `label_emb.0`)."""
    t = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "middle_block.1": "mid_block.attentions.0",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    if cfg.has_addition:  # SDXL: label_emb.0 is Sequential(Linear, SiLU, Linear)
        t["label_emb.0.0"] = "add_embedding.linear_1"
        t["label_emb.0.2"] = "add_embedding.linear_2"
    _block(t, "middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    _block(t, "middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    levels, per = len(cfg.block_channels), cfg.layers_per_block
    for level, attention in enumerate(cfg.attention_levels):
        # input_blocks: conv_in, then per level `per` ResBlocks (+ SpatialTransformer) and a downsampler
        for j in range(per):
            k = 1 + level * (per + 1) + j
            _block(t, f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET)
            if attention:
                t[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            t[f"input_blocks.{(level + 1) * (per + 1)}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
        # output_blocks run from the lowest resolution, as diffusers' up_blocks do; one more ResBlock a level
        up = levels - 1 - level
        for j in range(per + 1):
            k = up * (per + 1) + j
            _block(t, f"output_blocks.{k}.0", f"up_blocks.{up}.resnets.{j}", _UNET_RESNET)
            if attention:
                t[f"output_blocks.{k}.1"] = f"up_blocks.{up}.attentions.{j}"
        if level > 0:  # the upsampler follows the level's last ResBlock (and its transformer, if any)
            last = f"output_blocks.{up * (per + 1) + per}"
            t[f"{last}.{2 if attention else 1}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
    return t


def vae_table(cfg: VAEConfig) -> dict[str, str]:
    """VAE: original `encoder.down`/`decoder.up` (i=0 highest resolution in both) -> diffusers-style paths."""
    t = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        t[f"{side}.conv_in"] = f"{side}.conv_in"
        t[f"{side}.conv_out"] = f"{side}.conv_out"
        t[f"{side}.norm_out"] = f"{side}.conv_norm_out"
        _block(t, f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", _VAE_RESNET)
        _block(t, f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", _VAE_ATTENTION)
        _block(t, f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", _VAE_RESNET)
    levels, per = len(cfg.block_channels), cfg.layers_per_block
    for i in range(levels):
        for j in range(per):
            _block(t, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET)
        if i < levels - 1:
            t[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        up = levels - 1 - i  # diffusers' decoder up_blocks start at the lowest resolution
        for j in range(per + 1):
            _block(t, f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET)
        if i > 0:
            t[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return t


def clip_table(cfg: TextEncoderConfig) -> dict[str, str]:
    """OpenAI CLIP in transformers' layout (SD1, SDXL's ViT-L): the names are already sdtorch's."""
    t = {name: name for name in ("embeddings.token_embedding", "embeddings.position_embedding", "final_layer_norm")}
    t.update({f"encoder.layers.{i}": f"encoder.layers.{i}" for i in range(cfg.num_layers)})
    return t


def openclip_table(cfg: TextEncoderConfig) -> dict[str, str]:
    """OpenCLIP (SD2's ViT-H, SDXL's bigG): its modules renamed; q/k/v are split and the projection transposed
    apart from the renaming. Only the kept blocks (`cfg.num_layers`) and, `with_projection`, the projection."""
    t = {
        "token_embedding": "embeddings.token_embedding",
        "positional_embedding": "embeddings.position_embedding.weight",  # a bare Parameter in OpenCLIP
        "ln_final": "final_layer_norm",
    }
    if cfg.with_projection:
        t["text_projection"] = "text_projection.weight"  # a bare Parameter [W, P] in OpenCLIP, a Linear [P, W] here
    for i in range(cfg.num_layers):
        _block(t, f"transformer.resblocks.{i}", f"encoder.layers.{i}", _OPENCLIP_LAYER)
    return t


def text_encoder_table(config: ModelConfig) -> dict[str, str]:
    """The first text encoder's table: SD1 is already in transformers' layout; SD2 renames OpenCLIP's modules."""
    return _text_sections(config)[0].table


@dataclass(frozen=True)
class _Section:
    """One model part (or one of SDXL's text encoders) in both layouts."""

    part: str  # "unet", "vae" or "text_encoder"
    original: str  # key prefix in the original single file
    ours: str  # key prefix inside sdtorch's part ("encoders.1." for SDXL's second text encoder)
    table: dict[str, str]  # original module path (after `original`) -> sdtorch path (after `ours`)
    openclip: bool = False  # fused q/k/v and a transposed projection


def text_encoder_sections(config: ModelConfig) -> list[tuple[str, str, TextEncoderConfig]]:
    """(original prefix, sdtorch prefix, config) of each text encoder, in the conditioner's order.

    SDXL's encoder with a projection (bigG) is OpenCLIP in OpenCLIP's layout; the others (ViT-L) are OpenAI CLIP
    in transformers' layout, as the original files store them.
    """
    if config.family in TEXT_PREFIXES:
        return [(TEXT_PREFIXES[config.family], "", config.text_encoder)]
    if not config.is_sdxl:
        raise ArchitectureError(f"unknown model family {config.family!r}: expected one of "
                                f"{', '.join([*TEXT_PREFIXES, 'sdxl', 'sdxl-refiner'])}")
    return [((SDXL_OPENCLIP_PREFIX if cfg.with_projection else SDXL_CLIP_PREFIX).format(i), f"encoders.{i}.", cfg)
            for i, cfg in enumerate(config.text_encoders)]


def _text_sections(config: ModelConfig) -> list[_Section]:
    sections = []
    for original, ours, cfg in text_encoder_sections(config):
        openclip = config.family == "sd2" or cfg.with_projection
        table = openclip_table(cfg) if openclip else clip_table(cfg)
        sections.append(_Section("text_encoder", original, ours, table, openclip))
    return sections


def _sections(config: ModelConfig) -> list[_Section]:
    """Every section of the config's model: UNet, VAE, then the text encoder(s)."""
    return [
        _Section("unet", UNET_PREFIX, "", unet_table(config.unet)),
        _Section("vae", VAE_PREFIX, "", vae_table(config.vae)),
        *_text_sections(config),
    ]


def rename_key(key: str, table: dict[str, str]) -> str | None:
    """Rename `key` by the longest dotted prefix that `table` knows; None when none matches."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = table.get(".".join(parts[:n]))
        if head is not None:
            return ".".join([head, *parts[n:]])
    return None


def rename_all(sd: dict[str, Tensor], table: dict[str, str], what: str) -> dict[str, Tensor]:
    """Every tensor of `sd` renamed by `rename_key`; keys that fit no rule are an ArchitectureError reading
    "N tensor(s) <what>: <the first keys>"."""
    out, unplaced = {}, []
    for key, tensor in sd.items():
        name = rename_key(key, table)
        if name is None:
            unplaced.append(key)
        else:
            out[name] = tensor
    if unplaced:
        raise ArchitectureError(f"{len(unplaced)} tensor(s) {what}: {first_keys(unplaced)}")
    return out


def canonical_key(key: str) -> str:
    """Some old SD1 files store CLIP without `text_model.` (older transformers); give such keys today's name."""
    old = "cond_stage_model.transformer."
    if key.startswith(old) and not key.startswith(TEXT_PREFIXES["sd1"]):
        return TEXT_PREFIXES["sd1"] + key[len(old):]
    return key


def _is_ignored(key: str, config: ModelConfig) -> bool:
    block = _OPENCLIP_BLOCK.match(key)
    if config.family == "sd2" and block and int(block[1]) >= config.text_encoder.num_layers:
        return True  # SD2 conditions on the penultimate OpenCLIP block: the last one is never used
    return bool(_IGNORED.search(key))


def _unfuse_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in sd.items():
        fused = _FUSED_QKV.match(key)
        if fused:
            # [3C, ...] -> 3 x [C, ...]; cloned so the three do not share storage (safetensors refuses to save that)
            for name, chunk in zip("qkv", tensor.chunk(3)):
                out[f"{fused[1]}.{name}_proj.{fused[2]}"] = chunk.clone()
        else:
            out[key] = tensor
    return out


def _fuse_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out, groups = {}, {}
    for key, tensor in sd.items():
        split = _SPLIT_QKV.match(key)
        if split:
            groups.setdefault(f"{split[1]}.in_proj_{split[3]}", {})[split[2]] = tensor
        else:
            out[key] = tensor
    for key, qkv in groups.items():
        if len(qkv) != 3:
            raise ArchitectureError(f"text encoder: {key} needs q, k and v projections, got only {sorted(qkv)}")
        out[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])  # 3 x [C, ...] -> [3C, ...]
    return out


def first_keys(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _transpose(tensor: Tensor) -> Tensor:
    """OpenCLIP's projection [W, P] <-> a Linear's weight [P, W] (and back), contiguous like any loaded weight."""
    return tensor.t().contiguous()


def original_to_parts(
    sd: dict[str, Tensor], config: ModelConfig
) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Split an original single-file state dict into sdtorch-named `{"unet", "vae", "text_encoder"}` dicts.

    Returns the parts and the keys skipped on purpose (position ids, DDPM buffers, EMA copies,
    OpenCLIP's vision tower and logit scale, SD2's projection and last block, v-prediction markers). Any
    other key that fits no rule raises ArchitectureError. Missing keys are left for the strict load to report.
    """
    sections = _sections(config)
    raw: list[dict[str, Tensor]] = [{} for _ in sections]  # per section, keys without the original prefix
    ignored, unexpected = [], []
    for key, tensor in sd.items():
        key = canonical_key(key)
        if _is_ignored(key, config):
            ignored.append(key)
            continue
        index = next((i for i, section in enumerate(sections) if key.startswith(section.original)), None)
        if index is None:
            unexpected.append(key)
        else:
            raw[index][key[len(sections[index].original):]] = tensor

    parts: dict[str, dict[str, Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for section, tensors in zip(sections, raw):
        if section.openclip:
            tensors = _unfuse_qkv(tensors)
        for key, tensor in tensors.items():
            name = rename_key(key, section.table)
            if name is None:
                unexpected.append(section.original + key)
                continue
            if section.openclip and key == "text_projection":
                tensor = _transpose(tensor)
            parts[section.part][section.ours + name] = tensor
    if unexpected:
        count = len(unexpected)
        raise ArchitectureError(f"{count} tensor(s) fit no part of a {config.kind} model: {first_keys(unexpected)}")
    for key, tensor in parts["vae"].items():
        if _VAE_ATTENTION_WEIGHT.search(key) and tensor.ndim > 2:
            parts["vae"][key] = tensor.flatten(1)  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
    return parts, ignored


def parts_to_original(parts: dict[str, dict[str, Tensor]], config: ModelConfig) -> dict[str, Tensor]:
    """The exact inverse of `original_to_parts` for the tensors sdtorch keeps (SD2: only the kept blocks)."""
    out: dict[str, Tensor] = {}
    unknown = []
    sections = _sections(config)
    renamed: list[dict[str, Tensor]] = [{} for _ in sections]
    inverses = [{ours: original for original, ours in section.table.items()} for section in sections]
    for part, tensors in parts.items():
        candidates = [i for i, section in enumerate(sections) if section.part == part]
        for key, tensor in tensors.items():
            # the section whose sdtorch prefix the key has (the longest: SD1/SD2's text encoder has none)
            index = max((i for i in candidates if key.startswith(sections[i].ours)),
                        key=lambda i: len(sections[i].ours), default=None)
            name = None if index is None else rename_key(key[len(sections[index].ours):], inverses[index])
            if name is None:
                unknown.append(f"{part}: {key}")
                continue
            if part == "vae" and _VAE_ATTENTION_WEIGHT.search(key) and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
            if sections[index].openclip and name == "text_projection":
                tensor = _transpose(tensor)
            renamed[index][name] = tensor
    for section, tensors in zip(sections, renamed):
        if section.openclip:
            tensors = _fuse_qkv(tensors)
        out.update({section.original + key: tensor for key, tensor in tensors.items()})
    if unknown:
        raise ArchitectureError(f"{len(unknown)} tensor(s) have no name in the original layout: {first_keys(unknown)}")
    return out
