"""T2I-Adapter files: diffusers folders (config.json + diffusion_pytorch_model.safetensors), single files in
diffusers' names (`adapter.` prefix), and TencentARC's original files (`t2iadapter_*_sd14v1.pth`; the colour
adapter `t2iadapter_color_sd14v1.pth` is the light layout).

Original layouts (TencentARC/T2I-Adapter, `ldm/modules/encoders/adapter.py`; diffusers'
`scripts/convert_original_t2i_adapter.py` converts them):
- full (`Adapter`): `conv_in`, then one flat list of residual blocks `body.{k}`, `num_res_blocks` a level:
  `body.{i * n + j}.block1/block2` is diffusers' `body.{i}.resnets.{j}.block1/block2`, and the 1x1 conv of a
  level's first block where the width changes, `body.{i * n}.in_conv`, is `body.{i}.in_conv`;
- light (`Adapter_light`, the colour adapter): `body.{i}.in_conv`, `body.{i}.body.{j}.block1/block2`,
  `body.{i}.out_conv`: diffusers' names with `resnets` for the inner `body`.

The architecture is read from the tensors. What they cannot show: the full layout's level boundaries where the
width does not change (read as 2 blocks a level, every released adapter's, where the in_convs allow it), and the
pixel unshuffle's factor, read from conv_in's input channels as ComfyUI reads it: 256 or 768 (1 or 3 image
channels times 16 * 16) is SDXL's full_adapter_xl, other multiples of 64 the SD1 adapter; with `base`, the first
of these readings whose features fit that UNet. The original code's other options (`sk=False` skip convs, strided
conv downsampling, 3x3 second convs) have no diffusers equivalent and are refused with a clear error.

`.pth` files are read only through io.py's safe reader (torch.load with weights_only).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..configs import UNetConfig
from ..errors import ArchitectureError, CheckpointError, SdtorchError
from ..models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from ..models.unet import intrablock_points
from .detect import CONV, block_indices, tensor_shape
from .io import detect_format, read_checkpoint, read_json_object, read_shapes, weight_dtype
from .keymaps import UNET_PREFIX, rename_all

ADAPTER_PREFIX = "adapter."  # diffusers' T2IAdapter keeps its layers in `self.adapter`
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
LATENT_SCALE = 8  # how many times smaller than the image the latents are (every SD/SDXL VAE's)
ORIGINAL_RES_BLOCKS = 2  # the full adapters' blocks a level (nums_rb) in every released file
PART = "T2I-Adapter"

_DIFFUSERS = re.compile(r"body\.\d+\.resnets\.")
_ORIGINAL_FULL = re.compile(r"body\.\d+\.block1\.")
_ORIGINAL_LIGHT = re.compile(r"body\.\d+\.body\.\d+\.block1\.")

# Files that are not (plain) T2I-Adapters: (a key they have, what to say).
_NOT_ADAPTERS = [
    ("style_embedding", "a style adapter (T2I-Adapter's StyleAdapter, which adds CLIP image tokens to the text "
                        "context): not supported"),
    ("task_embedding", "a CoAdapter fuser (it mixes several adapters' features): not supported; load each "
                       "coadapter's own file"),
    ("control_model.input_hint_block.0.weight", "a ControlNet; load it with load_controlnet"),
    ("input_hint_block.0.weight", "a ControlNet; load it with load_controlnet"),
    ("controlnet_cond_embedding.conv_in.weight", "a ControlNet; load it with load_controlnet"),
]


@dataclass(frozen=True)
class T2IAdapterLoadReport:
    """What loading a T2I-Adapter found: the source and its layout."""

    source: str
    layout: str  # "original" | "diffusers" (a folder) | "diffusers_single_file"


def original_table(levels: int, res_blocks: int, light: bool) -> dict[str, str]:
    """Original module path -> sdtorch's (diffusers' without `adapter.`) for an adapter of `levels` levels (the
    light adapter's: all of them, its repeated last one too) of `res_blocks` residual blocks each."""
    n, table = res_blocks, {}
    for i in range(levels):
        if light:  # the same names, `body` for `resnets`
            table[f"body.{i}.in_conv"] = f"body.{i}.in_conv"
            table.update({f"body.{i}.body.{j}": f"body.{i}.resnets.{j}" for j in range(n)})
            table[f"body.{i}.out_conv"] = f"body.{i}.out_conv"
        else:  # one flat list of blocks; a level's in_conv sits in its first block
            table.update({f"body.{i * n + j}": f"body.{i}.resnets.{j}" for j in range(n)})
            table[f"body.{i * n}.in_conv"] = f"body.{i}.in_conv"
    if not light:
        table["conv_in"] = "conv_in"
    return table


def _is_original_light(sd: dict[str, Tensor]) -> bool:
    return any(_ORIGINAL_LIGHT.match(k) for k in sd)


def original_to_t2i_adapter(sd: dict[str, Tensor], res_blocks: int | None = None) -> dict[str, Tensor]:
    """An original-layout adapter's tensors in sdtorch's names (the full layout's blocks a level: `res_blocks`, or
    read from the tensors); a key that fits no rule is an ArchitectureError (missing ones are left for the strict
    load to report)."""
    light = _is_original_light(sd)
    blocks = len(_levels(sd))
    if light:
        n = max(len(block_indices(sd, f"body.{i}.body.")) for i in range(blocks))
        table = original_table(blocks, n, light=True)
    else:
        n = res_blocks or _original_res_blocks(sd)
        table = original_table(-(-blocks // n), n, light=False)
    return rename_all(sd, table, "fit no part of a T2I-Adapter")


def t2i_adapter_to_original(sd: dict[str, Tensor], config: T2IAdapterConfig) -> dict[str, Tensor]:
    """The inverse of `original_to_t2i_adapter`: sdtorch's names (or diffusers', `adapter.` stripped) to
    TencentARC's, for an adapter of `config`."""
    table = original_table(len(config.levels), config.num_res_blocks, config.adapter_type == "light_adapter")
    inverse = {ours: original for original, ours in table.items()}
    sd = {k.removeprefix(ADAPTER_PREFIX): v for k, v in sd.items()}
    return rename_all(sd, inverse, "have no name in the original layout")


def _levels(sd: dict[str, Tensor]) -> list[int]:
    levels = block_indices(sd, "body.")
    if not levels or levels != list(range(len(levels))):
        raise ArchitectureError(f"{PART}: its body.N blocks are numbered {levels}, not 0, 1, 2, ... (a damaged "
                                "or partial file?)")
    return levels


def _original_res_blocks(sd: dict[str, Tensor]) -> int:
    """The full layout's blocks a level: 2 (every released file's) where each width change (a block with an
    in_conv) starts a level of 2, else the largest count that puts every change at a level's start."""
    blocks = _levels(sd)
    starts = [k for k in blocks if f"body.{k}.in_conv.weight" in sd]
    if len(blocks) % ORIGINAL_RES_BLOCKS == 0 and all(k % ORIGINAL_RES_BLOCKS == 0 for k in starts):
        return ORIGINAL_RES_BLOCKS
    return math.gcd(len(blocks), *starts)


def _refuse_original_options(sd: dict[str, Tensor], source: str) -> None:
    """The original Adapter's options that diffusers' T2IAdapter cannot build: ArchitectureError naming them."""
    options = [("skep", "sk=False (a skip conv, `skep`, in each block)"),
               ("down_opt.op.weight", "use_conv=True (strided conv downsampling, `down_opt.op`)")]
    for part, what in options:
        if any(f".{part}" in k for k in sd):
            raise ArchitectureError(f"{source}: a T2I-Adapter built with {what}: diffusers' T2IAdapter has no such "
                                    "layer, and neither does sdtorch")
    block2 = sd.get("body.0.block2.weight")
    if block2 is not None and block2.ndim == 4 and block2.shape[-1] != 1:
        raise ArchitectureError(f"{source}: a T2I-Adapter built with ksize={block2.shape[-1]} (3x3 second convs); "
                                "the released adapters and diffusers' T2IAdapter use 1x1")


def _full_readings(cin: int) -> list[tuple[str, int]]:
    """(adapter_type, unshuffle factor) readings of a conv_in with `cin` input channels, likeliest first."""
    readings = []
    if cin % 256 == 0 and cin // 256 in (1, 3):
        readings.append(("full_adapter_xl", 16))
    if cin % 64 == 0:
        readings.append(("full_adapter", 8))
    if cin % 256 == 0 and cin // 256 not in (1, 3):
        readings.append(("full_adapter_xl", 16))
    return readings


def infer_t2i_adapter_config(sd: dict[str, Tensor], base: UNetConfig | None = None,
                             latent_scale: int = LATENT_SCALE) -> T2IAdapterConfig:
    """The T2IAdapterConfig a state dict in sdtorch's (diffusers' without `adapter.`) names describes; with `base`,
    the reading whose features fit that UNet (see the module's notes)."""
    levels = _levels(sd)
    res_blocks = {i: len(block_indices(sd, f"body.{i}.resnets.")) for i in levels}
    if len(set(res_blocks.values())) != 1 or not res_blocks[0]:
        raise ArchitectureError(f"{PART}: residual blocks a level {res_blocks}; diffusers' T2IAdapter has the same "
                                "number (at least 1) in each")
    n = res_blocks[0]
    if "body.0.out_conv.weight" in sd:  # the light adapter
        cin = tensor_shape(sd, "body.0.in_conv.weight", PART, CONV)[1]
        widths = [tensor_shape(sd, f"body.{i}.out_conv.weight", PART, CONV)[0] for i in levels]
        if len(widths) < 2 or widths[-1] != widths[-2]:
            raise ArchitectureError(f"{PART}: a light adapter's last two levels have the same width in diffusers' "
                                    f"T2IAdapter; this one's are {widths}")
        if cin % 64:
            raise ArchitectureError(f"{PART}: body.0.in_conv takes {cin} channels: not image channels * 8 * 8")
        return T2IAdapterConfig(in_channels=cin // 64, channels=tuple(widths[:-1]), num_res_blocks=n,
                                downscale_factor=8, adapter_type="light_adapter")
    cin = tensor_shape(sd, "conv_in.weight", PART, CONV)[1]
    widths = tuple(tensor_shape(sd, f"body.{i}.resnets.0.block1.weight", PART, CONV)[0] for i in levels)
    configs = []
    for kind, f in _full_readings(cin):
        try:
            configs.append(T2IAdapterConfig(in_channels=cin // f**2, channels=widths, num_res_blocks=n,
                                            downscale_factor=f, adapter_type=kind))
        except ArchitectureError:
            continue  # e.g. widths full_adapter_xl cannot build
    if not configs:
        raise ArchitectureError(f"{PART}: conv_in takes {cin} channels: not image channels * 8 * 8 (SD1's "
                                "adapters) or * 16 * 16 (SDXL's)")
    if base is not None:
        for config in configs:
            if not _misfits(config, base, latent_scale):
                return config
    return configs[0]


def _classify(sd: dict[str, Tensor], source: str) -> tuple[str, dict[str, Tensor]]:
    """(layout, tensors): "diffusers_single_file" with `adapter.` stripped, or "original"; ArchitectureError for
    a file that holds no T2I-Adapter, saying what it holds where that is clear."""
    for key, what in _NOT_ADAPTERS:
        if key in sd:
            raise ArchitectureError(f"{source} is {what}")
    if any(k.startswith(ADAPTER_PREFIX) for k in sd):
        return "diffusers_single_file", {k.removeprefix(ADAPTER_PREFIX): v for k, v in sd.items()}
    if any(_DIFFUSERS.match(k) for k in sd):
        return "diffusers_single_file", sd
    if any(_ORIGINAL_FULL.match(k) or _ORIGINAL_LIGHT.match(k) for k in sd):
        return "original", sd
    if any(k.startswith(UNET_PREFIX) for k in sd):
        raise ArchitectureError(f"{source} is a Stable Diffusion checkpoint, not a T2I-Adapter; load it as the model")
    raise ArchitectureError(f"{source} holds no T2I-Adapter: expected adapter.* (diffusers' names) or body.N.* "
                            "(TencentARC's layout)")


def is_t2i_adapter(source: str | os.PathLike) -> bool:
    """Whether a file or folder holds a T2I-Adapter rather than something else (a ControlNet: the A1111 extension
    takes both as a unit's model): a folder by its config's class, a file by its tensor names (a safetensors
    file's header only). Unreadable sources are False: the loader that runs next says why."""
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return read_json_object(path / "config.json").get("_class_name") == "T2IAdapter"
        tensors = read_shapes(path)[0] if detect_format(path) == "safetensors" else read_checkpoint(path)[0]
        _classify(tensors, str(path))
    except (OSError, ValueError, RecursionError, SdtorchError):
        return False
    return True


def read_t2i_adapter_file(
    path: str | os.PathLike, dtype: torch.dtype | None = None, base: UNetConfig | None = None,
    config: T2IAdapterConfig | None = None, latent_scale: int = LATENT_SCALE,
) -> tuple[T2IAdapterConfig, dict[str, Tensor], T2IAdapterLoadReport]:
    """A single T2I-Adapter file (TencentARC's layout or diffusers' names) as (config, tensors in sdtorch's names,
    report). `config` overrides the architecture read from the tensors (else read to fit `base`, whose latents
    are `latent_scale` times smaller than the image)."""
    path = Path(path)
    tensors, _ = read_checkpoint(path, dtype)
    layout, tensors = _classify(tensors, str(path))
    if layout == "original":
        _refuse_original_options(tensors, str(path))
        res_blocks = None if config is None or _is_original_light(tensors) else config.num_res_blocks
        tensors = original_to_t2i_adapter(tensors, res_blocks)
    if config is None:
        config = infer_t2i_adapter_config(tensors, base, latent_scale)
    return config, tensors, T2IAdapterLoadReport(str(path), layout)


def read_t2i_adapter_folder(
    folder: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[T2IAdapterConfig, dict[str, Tensor], T2IAdapterLoadReport]:
    """A diffusers T2IAdapter folder (config.json and diffusion_pytorch_model.safetensors, or .bin read with
    weights_only) as (config, tensors in sdtorch's names, report)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    cfg = read_json_object(config_file, f"{folder} is a folder but not a diffusers T2I-Adapter: no config.json")
    name = cfg.get("_class_name", "T2IAdapter")
    if name != "T2IAdapter":
        raise ArchitectureError(f"{config_file}: a {name}, not a T2IAdapter (sdtorch loads those; a MultiAdapter's "
                                "adapters each have a folder of their own)")
    config = T2IAdapterConfig.from_diffusers(cfg, source=str(config_file))
    for file_name in WEIGHT_FILES:
        if (folder / file_name).is_file():
            tensors, _ = read_checkpoint(folder / file_name, dtype)
            tensors = {k.removeprefix(ADAPTER_PREFIX): v for k, v in tensors.items()}
            return config, tensors, T2IAdapterLoadReport(str(folder), "diffusers")
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def load_t2i_adapter(
    source: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
    base: UNetConfig | None = None, config: T2IAdapterConfig | None = None, latent_scale: int = LATENT_SCALE,
) -> T2IAdapter:
    """Load a T2I-Adapter strictly from a diffusers folder or a single file (TencentARC's layout or diffusers'
    names; .safetensors, or .pth/.bin/.ckpt read with weights_only).

    dtype: weight dtype (default float32), cast while reading. device: where it lives (default CPU).
    base: the config of the UNet it will steer: picks the reading of a single file's tensors that fits it (see the
        module's notes), and the adapter is checked against it (`check_fits`).
    config: overrides the architecture read from a single file.
    latent_scale: how many times smaller than the image the base model's latents are (its VAE's factor).
    The returned model is in eval mode without gradients; `model.load_report` says what was read.
    """
    from .loading import build_model  # loading.py imports the pipeline

    dtype = weight_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_dir():
        config, tensors, report = read_t2i_adapter_folder(path, dtype)
    elif path.is_file():
        config, tensors, report = read_t2i_adapter_file(path, dtype, base, config, latent_scale)
    else:
        raise CheckpointError(f"no such T2I-Adapter file or folder: {source}")
    if base is not None:
        check_fits(config, base, str(source), latent_scale)
    model = build_model(T2IAdapter, config, tensors, PART, dtype, device, source=str(source))
    model.load_report = report
    return model


def _misfits(config: T2IAdapterConfig, base: UNetConfig, latent_scale: int = LATENT_SCALE) -> list[str]:
    """Why an adapter of `config` cannot steer a UNet of `base`: its features against the UNet's intrablock points
    (`models.unet.intrablock_points`); [] when it can."""
    points = intrablock_points(base)
    levels = len(base.block_channels)
    widths = [cout for _, cout, _ in config.levels]
    features = list(zip(widths, config.feature_downscales))
    if len(features) not in (levels, levels + 1):
        return [f"it makes {len(features)} features; the UNet takes one for each of its {levels} down levels "
                f"(and optionally one for its mid block)"]
    problems = []
    for i, ((width, scale), (ch, down)) in enumerate(zip(features, points)):
        if (width, scale) != (ch, down * latent_scale):
            where = "the mid block's output" if i == levels else f"down level {i}"
            problems.append(f"feature {i} has {width} channels at 1/{scale} of the image size; {where} takes "
                            f"{ch} at 1/{down * latent_scale}")
    return problems


def check_fits(
    config: T2IAdapterConfig, base: UNetConfig, source: str = "the T2I-Adapter", latent_scale: int = LATENT_SCALE
) -> None:
    """ArchitectureError unless an adapter of `config` can steer a UNet of `base` (with latents `latent_scale`
    times smaller than the image): each feature has the width and size of the point where the UNet adds it (an
    adapter for SD1 cannot steer SDXL)."""
    problems = _misfits(config, base, latent_scale)
    if problems:
        raise ArchitectureError(f"{source} does not fit this model: {'; '.join(problems)} (a T2I-Adapter for "
                                "another model family?)")
