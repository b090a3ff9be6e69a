"""ControlNet files: diffusers folders, single files in diffusers' names, and the original layout of the A1111
extension's `control_v11*.pth/.safetensors` (Zhang's ControlNet repositories' `cldm`).

Original layout (`control_model.` prefix, or none in files distributed bare), beside the UNet encoder's names
(`time_embed`, `label_emb` for SDXL, `input_blocks`, `middle_block`, renamed by keymaps.py's UNet rules):
- `input_hint_block.{0, 2, ..., 4n-2}`: the hint encoder's convs (SiLUs between at the odd indices): 0 is
  diffusers' `controlnet_cond_embedding.conv_in`, 2(k+1) its `blocks.{k}`, the last its `conv_out`;
- `zero_convs.{i}.0`: `controlnet_down_blocks.{i}`, one for each skip of the down path;
- `middle_block_out.0`: `controlnet_mid_block`.

The architecture is read from the tensors; what they cannot show follows the UNet this ControlNet will run beside
(`base`), where given, else SD's conventions: the attention heads (8 a level with conv projections, as SD1 has;
head width 64 with linear ones, as SD2 and SDXL have) and, for SDXL, the width of each size number's embedding
(256). Whether a ControlNet averages its residuals over the image (the shuffle model's `global_average_pooling`)
is not in the tensors either: the A1111 extension takes it from a "shuffle" in the file name, and so does
`load_controlnet` unless told.

`.pth`/`.ckpt` files are read only through io.py's safe reader (torch.load with weights_only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..configs import ControlNetConfig, UNetConfig
from ..errors import ArchitectureError, CheckpointError, InvalidInputError
from ..models.controlnet import ControlNet
from .detect import CONV, block_indices, tensor_shape, unet_config_from_tensors
from .io import (
    describe_error, detect_format, legacy_model_hash, read_checkpoint, read_safetensors_header,
    weight_dtype, write_folder, write_json, write_safetensors,
)
from .keymaps import UNET_PREFIX, rename_all, unet_table

logger = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
SDXL_TIME_ID_WIDTH = 256  # the width of each SDXL size number's sinusoid (every released SDXL model's)
_HINT = "input_hint_block."
_DIFFUSERS_HINT = "controlnet_cond_embedding.conv_in.weight"

# Files that look like ControlNets but are not plain ones: (key, what to say).
_UNSUPPORTED = [
    ("lora_controlnet", "a Control-LoRA (a ControlNet stored as low-rank differences): not supported yet"),
    ("difference", "a ControlNet stored as its difference from SD 1.5's UNet: not supported yet; use the full "
                   "control_v11 file"),
    ("control_add_embedding.linear_1.weight", "a ControlNet Union (several condition types in one model): not "
                                              "supported yet"),
    ("task_embedding", "a ControlNet Union (several condition types in one model): not supported yet"),
]


@dataclass(frozen=True)
class ControlNetLoadReport:
    """What loading a ControlNet found: the source, its layout and the tensors skipped on purpose."""

    source: str
    layout: str  # "original" | "diffusers" (a folder) | "diffusers_single_file"
    ignored_keys: list[str] = field(default_factory=list)


def _num_skips(cfg: UNetConfig) -> int:
    """The skips of a UNet's down path: conv_in's, each stage's, each downsampler's (one zero conv each)."""
    levels = len(cfg.block_channels)
    return 1 + levels * cfg.layers_per_block + levels - 1


def controlnet_table(cfg: ControlNetConfig) -> dict[str, str]:
    """Original module path -> sdtorch's (diffusers') for a ControlNet: the UNet's rules for the encoder it copies
    (keymaps.unet_table), then the hint encoder, the zero convolutions and the mid block's."""
    table = {k: v for k, v in unet_table(cfg.unet).items() if not k.startswith(("output_blocks.", "out."))}
    convs = 2 * len(cfg.hint_channels)  # conv_in, two a downscaling step, conv_out: at the even indices
    table[f"{_HINT}0"] = "controlnet_cond_embedding.conv_in"
    for k in range(convs - 2):
        table[f"{_HINT}{2 * (k + 1)}"] = f"controlnet_cond_embedding.blocks.{k}"
    table[f"{_HINT}{2 * (convs - 1)}"] = "controlnet_cond_embedding.conv_out"
    for i in range(_num_skips(cfg.unet)):
        table[f"zero_convs.{i}.0"] = f"controlnet_down_blocks.{i}"
    table["middle_block_out.0"] = "controlnet_mid_block"
    return table


def original_to_controlnet(sd: dict[str, Tensor], cfg: ControlNetConfig) -> dict[str, Tensor]:
    """An original-layout ControlNet's tensors (without the `control_model.` prefix) in sdtorch's names; a key
    that fits no rule is an ArchitectureError (missing ones are left for the strict load to report)."""
    return rename_all(sd, controlnet_table(cfg), "fit no part of a ControlNet")


def controlnet_to_original(
    sd: dict[str, Tensor], cfg: ControlNetConfig, prefix: str = CONTROL_PREFIX
) -> dict[str, Tensor]:
    """The exact inverse of `original_to_controlnet`, with `prefix` (the A1111 extension's files have
    `control_model.`)."""
    inverse = {ours: original for original, ours in controlnet_table(cfg).items()}
    renamed = rename_all(sd, inverse, "have no name in the original layout")
    return {prefix + name: tensor for name, tensor in renamed.items()}


def infer_controlnet_config(
    sd: dict[str, Tensor], base: UNetConfig | None = None, global_pool: bool = False
) -> ControlNetConfig:
    """The ControlNetConfig an original-layout state dict (without the `control_model.` prefix) describes; heads
    and SDXL's size-number width from `base` where its levels have the same widths, its norm groups, else SD's
    conventions."""
    part = "ControlNet"
    hint = block_indices(sd, _HINT)
    convs = len(hint)  # conv_in, a pair a downscaling step, conv_out
    if convs < 2 or convs % 2 or hint != list(range(0, 2 * convs, 2)):
        raise ArchitectureError(f"{part}: hint encoder convs {_HINT}{hint} are not numbered 0, 2, 4, ... with a "
                                "pair for each downscaling step (diffusers' conditioning embedding)")
    first = tensor_shape(sd, f"{_HINT}0.weight", part, CONV)
    # each step's second conv (stride 2, at 4k) sets the next width
    widths = (first[0], *(tensor_shape(sd, f"{_HINT}{4 * k}.weight", part, CONV)[0] for k in range(1, convs // 2)))
    try:  # the encoder has no output conv (a ControlNet has no out_channels; 4 is recorded)
        unet = unet_config_from_tensors(sd, out_channels=4, norm_groups=base.norm_groups if base is not None else 32)
    except ArchitectureError as e:
        raise ArchitectureError(str(e).replace("UNet:", f"{part} (its UNet encoder):", 1)) from None
    unet = _from_base(unet, base)
    return ControlNetConfig(unet=unet, conditioning_channels=first[1], hint_channels=widths,
                            global_pool_conditions=global_pool)


def _from_base(unet: UNetConfig, base: UNetConfig | None) -> UNetConfig:
    """`unet` (read from tensors) with what tensors cannot show taken from `base` where it applies."""
    heads = list(unet.num_heads)
    if base is not None and base.use_linear_proj == unet.use_linear_proj:
        for level, ch in enumerate(unet.block_channels):
            if level < len(base.block_channels) and base.block_channels[level] == ch:
                heads[level] = base.num_heads[level]
    changes: dict = dict(num_heads=tuple(heads), sample_size=base.sample_size if base is not None else 64)
    if unet.has_addition:
        width = base.addition_time_embed_dim if base is not None and base.has_addition else SDXL_TIME_ID_WIDTH
        if unet.addition_in_dim <= width:
            raise ArchitectureError(f"ControlNet: label_emb.0.0.weight takes {unet.addition_in_dim} inputs: too few "
                                    f"for a pooled text embedding and size numbers {width} wide each")
        changes["addition_time_embed_dim"] = width
    return dataclasses.replace(unet, **changes)


def _diffusers_names_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ControlNet in diffusers' names renamed to the original layout (to read its architecture the one way):
    the rules are built from the counts of levels, stages and hint convs, which diffusers' names show."""
    levels = len(block_indices(sd, "down_blocks."))
    per = len(block_indices(sd, "down_blocks.0.resnets."))
    blocks = len(block_indices(sd, "controlnet_cond_embedding.blocks."))
    if levels < 1 or per < 1 or blocks % 2:
        raise ArchitectureError(f"ControlNet: {levels} down block(s) of {per} ResBlock(s) and {blocks} hint encoder "
                                "block(s): not a ControlNet in diffusers' layout")
    addition = "add_embedding.linear_1.weight" in sd
    scaffold = ControlNetConfig(
        unet=UNetConfig(block_channels=(1,) * levels, attention_levels=(True,) * levels, layers_per_block=per,
                        num_heads=(1,) * levels, norm_groups=1, addition_time_embed_dim=int(addition),
                        addition_in_dim=2 * int(addition)),
        hint_channels=(1,) * (blocks // 2 + 1),
    )
    return controlnet_to_original(sd, scaffold, prefix="")


def _unsupported(sd: dict[str, Tensor], source: str) -> None:
    for key, what in _UNSUPPORTED:
        if key in sd:
            raise ArchitectureError(f"{source} is {what}")
    if not any(k.startswith((CONTROL_PREFIX, _HINT)) for k in sd) and _DIFFUSERS_HINT not in sd:
        if any(k.startswith(UNET_PREFIX) for k in sd):
            raise ArchitectureError(f"{source} is a Stable Diffusion checkpoint, not a ControlNet (no "
                                    f"{CONTROL_PREFIX}* tensors); load it as the model")
        raise ArchitectureError(f"{source} holds no ControlNet: expected {CONTROL_PREFIX}{_HINT}* (the original "
                                f"layout), {_HINT}* or {_DIFFUSERS_HINT} (diffusers' names)")


def _is_shuffle(path: Path) -> bool:
    return "shuffle" in path.stem.lower()


def read_controlnet_file(
    path: str | os.PathLike, dtype: torch.dtype | None = None, base: UNetConfig | None = None,
    config: ControlNetConfig | None = None, global_pool: bool | None = None,
) -> tuple[ControlNetConfig, dict[str, Tensor], ControlNetLoadReport]:
    """A single ControlNet file (original layout, with or without `control_model.`, or diffusers' names) as
    (config, tensors in sdtorch's names, report). `config` overrides the architecture read from the tensors;
    `global_pool` overrides the file-name rule. Tensors outside `control_model.` in a file that has it (a whole
    training checkpoint: the SD model beside its ControlNet) are skipped and reported."""
    path = Path(path)
    tensors, _ = read_checkpoint(path, dtype)
    _unsupported(tensors, str(path))
    pool = _is_shuffle(path) if global_pool is None else global_pool
    ignored: list[str] = []
    if _DIFFUSERS_HINT in tensors:
        layout, ours = "diffusers_single_file", tensors
        original = _diffusers_names_to_original(tensors)
    else:
        layout = "original"
        if any(k.startswith(CONTROL_PREFIX) for k in tensors):
            ignored = [k for k in tensors if not k.startswith(CONTROL_PREFIX)]
            tensors = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
        original, ours = tensors, None
    if config is None:
        config = infer_controlnet_config(original, base, pool)
    elif global_pool is not None:
        config = dataclasses.replace(config, global_pool_conditions=global_pool)
    if ours is None:
        ours = original_to_controlnet(original, config)
    return config, ours, ControlNetLoadReport(str(path), layout, ignored)


def read_controlnet_folder(
    folder: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[ControlNetConfig, dict[str, Tensor], ControlNetLoadReport]:
    """A diffusers ControlNet folder (config.json and diffusion_pytorch_model.safetensors, or .bin read with
    weights_only) as (config, tensors, report)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is a folder but not a diffusers ControlNet: no config.json") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {config_file}: {describe_error(e)}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_file} holds a JSON {type(cfg).__name__}, not an object")
    name = cfg.get("_class_name", "ControlNetModel")
    if name != "ControlNetModel":
        raise ArchitectureError(f"{config_file}: a {name}, not a ControlNetModel (sdtorch loads those)")
    config = ControlNetConfig.from_diffusers(cfg, source=str(config_file))
    for file_name in WEIGHT_FILES:
        if (folder / file_name).is_file():
            tensors, _ = read_checkpoint(folder / file_name, dtype)
            return config, tensors, ControlNetLoadReport(str(folder), "diffusers")
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def load_controlnet(
    source: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
    base: UNetConfig | None = None, config: ControlNetConfig | None = None, global_pool: bool | None = None,
) -> ControlNet:
    """Load a ControlNet strictly from a diffusers folder or a single file (original layout or diffusers' names).

    dtype: weight dtype (default float32), cast while reading. device: where it lives (default CPU).
    base: the config of the UNet it will run beside: supplies what a single file's tensors cannot show (see the
        module's notes) and is checked against (latent channels, context width, SDXL's addition embedding).
    config, global_pool: override the architecture read from a single file and the shuffle rule.
    The returned model is in eval mode without gradients; `model.load_report` says what was read and skipped.
    """
    from .loading import build_model  # loading.py imports the pipeline, which will import this module

    dtype = weight_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_dir():
        config, tensors, report = read_controlnet_folder(path, dtype)
    elif path.is_file():
        config, tensors, report = read_controlnet_file(path, dtype, base, config, global_pool)
    else:
        raise CheckpointError(f"no such ControlNet file or folder: {source}")
    if base is not None:
        check_fits(config, base, str(source))
    model = build_model(ControlNet, config, tensors, "ControlNet", dtype, device, source=str(source))
    model.load_report = report
    return model


def controlnet_title(source: str | os.PathLike) -> str:
    """The A1111 extension's name for a ControlNet file, "name [hash]" (its file name without suffix and A1111's
    legacy 8-digit hash); a diffusers folder is named by the folder, hashed by its weights file."""
    path = Path(source).expanduser()
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None) if path.is_dir() else path
    name = path.name if path.is_dir() else path.stem
    return f"{name} [{legacy_model_hash(weights)}]" if weights is not None else name


def check_fits(config: ControlNetConfig, base: UNetConfig, source: str = "the ControlNet") -> None:
    """ArchitectureError unless a ControlNet of `config` can run beside a UNet of `base`: the same latents,
    context, SDXL conditioning and skips (a ControlNet for SD1 cannot steer SDXL)."""
    unet = config.unet
    problems = []
    if unet.in_channels != base.in_channels and not (base.in_channels == 9 and unet.in_channels == 4):
        problems.append(f"it takes {unet.in_channels}-channel latents, the UNet {base.in_channels}")
    if unet.context_dim != base.context_dim:
        problems.append(f"its text context is {unet.context_dim} wide, the UNet's {base.context_dim} (a ControlNet "
                        f"for another model family)")
    if (unet.has_addition, unet.addition_in_dim) != (base.has_addition, base.addition_in_dim):
        problems.append("its SDXL conditioning (the addition embedding) differs from the UNet's")
    if (unet.block_channels, unet.layers_per_block) != (base.block_channels, base.layers_per_block):
        problems.append(f"its levels ({unet.block_channels}, {unet.layers_per_block} a level) are not the UNet's "
                        f"({base.block_channels}, {base.layers_per_block}), so its residuals do not fit the skips")
    if problems:
        raise ArchitectureError(f"{source} does not fit this model: {'; '.join(problems)}")


# ---- saving ------------------------------------------------------------------------------------------------------

SAVE_FORMATS = ("diffusers", "single_file")
# What a diffusers ControlNet folder holds (hub repositories add the README, licence and git files); a folder holding
# anything else is not one and is never replaced.
_FOLDER_ENTRIES = frozenset({"config.json", *WEIGHT_FILES, "README.md", "LICENSE", "LICENSE.md", ".gitattributes",
                             ".gitignore"})


def _not_a_controlnet(path: Path, format: str) -> str | None:
    """Why the existing `path` (a folder for "diffusers", a file for "single_file") may not be replaced by a
    ControlNet in `format`, or None when it may."""
    if format == "diffusers":
        names = {entry.name for entry in path.iterdir()}
        others = sorted(names - _FOLDER_ENTRIES)
        if others:
            shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
            return f"it holds files a diffusers ControlNet does not ({shown})"
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return "it has no readable config.json"
        name = cfg.get("_class_name") if isinstance(cfg, dict) else None
        return None if name == "ControlNetModel" else f"its config.json describes a {name}, not a ControlNetModel"
    try:
        if detect_format(path) != "safetensors":
            return "it is not a safetensors file"
        entries, _, _ = read_safetensors_header(path)
    except CheckpointError as e:
        return f"it is not a safetensors file ({e})"
    if not any(k.startswith((CONTROL_PREFIX, _HINT)) or k == _DIFFUSERS_HINT for k in entries):
        return "it holds no ControlNet"
    return None


def _misread(config: ControlNetConfig, original: dict[str, Tensor]) -> list[str]:
    """How `load_controlnet(file, base=config.unet)` would misread `config` from a file of the original-layout tensors
    `original` (the layout records shapes only; e.g. norm_groups other than SD's 32): [] when it reads it right."""
    stripped = {k.removeprefix(CONTROL_PREFIX): v for k, v in original.items()}
    try:
        inferred = infer_controlnet_config(stripped, config.unet, config.global_pool_conditions)
    except ArchitectureError as e:
        return [f"read SD's way its tensors fail: {e}"]
    ours, theirs = dataclasses.asdict(config), dataclasses.asdict(inferred)
    ours.update({f"unet.{k}": v for k, v in ours.pop("unet").items() if k not in ("sample_size", "out_channels")})
    theirs.update({f"unet.{k}": v for k, v in theirs.pop("unet").items()})
    return [f"{k} {v!r} would read as {theirs[k]!r}" for k, v in ours.items() if v != theirs[k]]


def save_controlnet(model: ControlNet, path: str | os.PathLike, format: str = "diffusers",
                    overwrite: bool = False) -> Path:
    """Write `model` to `path`; returns the path.

    format "diffusers": a folder as diffusers' `ControlNetModel.save_pretrained` writes it (config.json from
        `ControlNetConfig.to_diffusers()`, diffusion_pytorch_model.safetensors in diffusers' names = sdtorch's),
        written beside `path` and renamed into place, so a failure leaves `path` as it was.
    format "single_file": one safetensors file in the original layout of the A1111 extension's files
        (`control_model.*`, `controlnet_to_original`), written to a temp file and renamed.
    Both load with `load_controlnet` and the folder with diffusers' `ControlNetModel.from_pretrained`. The original
    layout records only tensors: a single file needs `base` (the UNet's config) where the heads or norm groups are not
    SD's, and `config` where even that misreads it: a warning names such settings, and the diffusers format
    records them all. An existing `path` is
    refused unless `overwrite`, and even then replaced only if it is a ControlNet in the same format: a user's
    other files are never deleted to make room.
    """
    if format not in SAVE_FORMATS:
        raise InvalidInputError(f"unknown ControlNet save format {format!r}: use one of {', '.join(SAVE_FORMATS)}")
    path = Path(path).expanduser()
    if format == "single_file" and path.is_dir():
        raise InvalidInputError(f"{path} is a folder; a single-file ControlNet needs a file name (*.safetensors)")
    if format == "diffusers" and os.path.lexists(path) and not path.is_dir():
        raise InvalidInputError(f"{path} is a file; a diffusers ControlNet is a folder")
    if os.path.lexists(path) and not (path.is_dir() and not any(path.iterdir())):
        problem = _not_a_controlnet(path, format) if overwrite else "pass overwrite=True to replace it"
        if problem:
            raise InvalidInputError(f"{path} already exists and is not replaced: {problem}")
    tensors = {k: v.detach() for k, v in model.state_dict().items()}  # diffusers' names
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "single_file":
        original = controlnet_to_original(tensors, model.config)  # control_model.* names
        misread = _misread(model.config, original)
        if misread:
            logger.warning("%s: the original layout does not record this ControlNet's architecture (%s): load it with "
                           "load_controlnet(..., config=...), or export the diffusers format, which records it", path,
                           "; ".join(misread))
        write_safetensors(original, path, {"format": "pt"})  # atomic: a temp file renamed into place
        return path

    def fill(staging: Path) -> None:
        write_json(model.config.to_diffusers(), staging / "config.json")
        write_safetensors(tensors, staging / WEIGHT_FILES[0], {"format": "pt"})

    write_folder(path, fill)
    return path
