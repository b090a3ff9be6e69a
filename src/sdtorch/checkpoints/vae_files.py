"""A VAE given apart from the checkpoint (A1111's "SD VAE" setting, `--vae`): read, checked against the model's
VAE, swapped in place of its weights, and named in the infotext.

    pipe.load_vae("vae-ft-mse-840000-ema-pruned.safetensors")   # -> swap_vae(pipe.vae, pipe.config, path, ...)
    pipe.load_vae(None)                                          # the checkpoint's own VAE again

The files users bring:
- the original layout (`vae-ft-mse-840000-ema-pruned.ckpt`, `sdxl_vae.safetensors`): `encoder.*`, `decoder.*`,
  `quant_conv`, `post_quant_conv`, sometimes under `first_stage_model.`, sometimes with a training run's
  `loss.*` (the discriminator) and `model_ema.*` entries, skipped as A1111 skips them. Renamed by keymaps.py's
  rules (`original_to_parts`), as the VAE of a whole checkpoint is;
- diffusers' AutoencoderKL (madebyollin's `sdxl-vae-fp16-fix`, `stabilityai/sd-vae-ft-mse`): its folder
  (`config.json`, `diffusion_pytorch_model.safetensors`), a whole model's folder (its `vae/`), or the weights
  file alone. These already carry sdtorch's names, except that files written before diffusers 0.14 call the
  mid-block attention `query`, `key`, `value` and `proj_attn`.

The VAE must have the model's architecture, tensor for tensor (a mismatch names the file and the tensor); it
takes the model's scaling factor (SDXL 0.13025, SD 0.18215) and each weight's dtype and device. A1111 names the
VAE by its file's name and hashes it as it hashes checkpoints, the first 10 hex digits of the whole file's
sha256: "VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.ckpt". A folder is named by its own name and
hashed by the weights file read from it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..configs import ModelConfig, VAEConfig
from ..errors import ArchitectureError, CheckpointError, InvalidInputError
from .io import describe_error, file_sha256, read_checkpoint
from .keymaps import VAE_PREFIX, original_to_parts, parts_to_original
from .loading import PART_WEIGHT_FILES

WEIGHT_FILES = PART_WEIGHT_FILES["vae"]  # of a diffusers VAE folder, in order of preference (as `sdtorch.load`'s)
# What a VAE file may carry besides the VAE: the training run's loss (discriminator, LPIPS) and EMA bookkeeping.
_IGNORED = re.compile(r"^(loss\.|model_ema\.)")
_DIFFUSERS_KEY = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
_OLD_ATTENTION = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14
# The fields that make two VAEs the same architecture (the scaling factor is checked apart).
_ARCHITECTURE = ("in_channels", "out_channels", "latent_channels", "block_channels", "layers_per_block", "norm_groups")


@dataclass
class LoadedVae:
    """A VAE file in use instead of the checkpoint's own (`Pipeline.load_vae`)."""

    source: str  # the path given
    name: str  # A1111's "VAE": the file's (or folder's) name
    hash: str  # A1111's "VAE hash": the first 10 hex digits of the weights file's sha256
    ignored_keys: list[str] = field(default_factory=list)  # loss.* / model_ema.* entries skipped
    original: dict[str, Tensor] = field(default_factory=dict, repr=False)  # the checkpoint's own VAE weights

    @property
    def infotext(self) -> dict[str, str]:
        """The infotext's keys for this VAE, A1111's ("VAE hash", "VAE")."""
        return {"VAE hash": self.hash, "VAE": self.name}


def swap_vae(vae: nn.Module, config: ModelConfig, path: str | os.PathLike | None,
             loaded: LoadedVae | None) -> LoadedVae | None:
    """Give `vae` the weights of the VAE file or folder at `path` (None: its checkpoint's own weights again) and
    return what is loaded now. `loaded` is what was loaded before (None: the checkpoint's own weights).

    The weights are replaced, not copied into: `vae` stays the same module (whatever holds it sees the new
    weights) and the checkpoint's own tensors are kept aside, so that going back restores them exactly. Nothing
    changes when the file cannot be read or does not fit.
    """
    if path is None:
        if loaded is not None:
            _assign(vae, loaded.original)
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError(f"a VAE is given as a path to its file or folder, not a {type(path).__name__}")
    tensors, weights_file, ignored = read_vae(path, vae, config)
    name = Path(os.path.abspath(Path(path).expanduser())).name  # the name given (A1111's basename), links unfollowed
    digest = file_sha256(weights_file)[:10]
    original = loaded.original if loaded is not None else {k: v.detach() for k, v in vae.state_dict().items()}
    _assign(vae, tensors)
    return LoadedVae(str(path), name, digest, ignored, original)


def _assign(vae: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Make `tensors` the module's weights (no copy where dtype and device already agree), each in the dtype and
    on the device of the weight it replaces."""
    current = vae.state_dict()
    moved = {k: v.to(device=current[k].device, dtype=current[k].dtype) for k, v in tensors.items()}
    vae.load_state_dict(moved, strict=True, assign=True)


def read_vae(
    path: str | os.PathLike, vae: nn.Module, config: ModelConfig
) -> tuple[dict[str, Tensor], Path, list[str]]:
    """The tensors of a VAE file or folder in sdtorch's names, checked against `vae` (each name present, each
    shape equal) and cast to its weights' dtypes and devices; with the weights file read and the keys skipped."""
    given = Path(path).expanduser()
    if given.is_dir():
        folder = given / "vae" if not _weights_file(given) and (given / "vae").is_dir() else given
        weights = _weights_file(folder)
        if weights is None:
            raise CheckpointError(f"{given}: a folder without a VAE's weights (looked for {', '.join(WEIGHT_FILES)}, "
                                  "and in its vae/ subfolder)")
        _check_diffusers_config(folder / "config.json", config.vae, config.kind)
    elif given.is_file():
        weights = given
    elif given.exists():
        raise CheckpointError(f"{given} is neither a regular file nor a folder")
    else:
        raise CheckpointError(f"no such VAE file or folder: {given}")
    expected = vae.state_dict()
    dtype = next((v.dtype for v in expected.values() if v.is_floating_point()), None)
    try:
        stored, _ = read_checkpoint(weights, dtype)  # a .ckpt / .bin only with weights_only=True
    except CheckpointError as e:
        if str(weights) not in str(e):
            e.args = (f"{weights}: {e}",)
        raise
    tensors, name, ignored = _sdtorch_names(stored, config, weights)
    _check_fits(tensors, name, expected, weights)
    return ({k: v.to(device=expected[k].device, dtype=expected[k].dtype) for k, v in tensors.items()},
            weights, ignored)


def _weights_file(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)


def _check_diffusers_config(file: Path, ours: VAEConfig, kind: str) -> None:
    """A diffusers folder's config.json (when it has one) must describe this model's VAE."""
    if not file.is_file():
        return
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{file}: unreadable VAE config ({describe_error(e)})") from None
    if not isinstance(data, dict) or "block_out_channels" not in data:
        raise CheckpointError(f"{file} is not a diffusers AutoencoderKL config (no block_out_channels)")
    theirs = VAEConfig.from_diffusers(data, source=str(file))
    for name in _ARCHITECTURE:
        if getattr(theirs, name) != getattr(ours, name):
            raise ArchitectureError(f"{file}: a VAE with {name} {getattr(theirs, name)}; this {kind} model's VAE has "
                                    f"{getattr(ours, name)}")
    if "scaling_factor" in data and theirs.scaling_factor != ours.scaling_factor:
        raise ArchitectureError(
            f"{file}: a VAE made for latents scaled by {theirs.scaling_factor}, but this {kind} model's are scaled "
            f"by {ours.scaling_factor} (SDXL 0.13025, SD1/SD2 0.18215): a VAE of another model family")


def _sdtorch_names(
    stored: dict[str, Tensor], config: ModelConfig, file: Path
) -> tuple[dict[str, Tensor], Callable[[str], str], list[str]]:
    """(tensors by sdtorch's names, sdtorch name -> the file's name for messages, the keys skipped)."""
    prefixed = any(k.startswith(VAE_PREFIX) for k in stored)
    tensors, ignored, foreign = {}, [], []
    for key, tensor in stored.items():
        name = key.removeprefix(VAE_PREFIX) if prefixed else key
        if _IGNORED.match(name):
            ignored.append(key)
        elif prefixed and name == key:  # beside first_stage_model.*: another part of a whole checkpoint
            foreign.append(key)
        else:
            tensors[name] = tensor
    if foreign:
        raise ArchitectureError(f"{file}: {len(foreign)} tensor(s) are not a VAE's ({', '.join(foreign[:3])}"
                                f"{' ...' if len(foreign) > 3 else ''}): a whole checkpoint? Give it as the model")
    if not tensors:
        raise ArchitectureError(f"{file}: no VAE tensors in it")
    prefix = VAE_PREFIX if prefixed else ""
    if any(_DIFFUSERS_KEY.match(k) for k in tensors):  # diffusers' names: sdtorch's, but for old attention names
        renamed = {_OLD_ATTENTION.sub(lambda m: f"{m[1]}.{_OLD_ATTENTION_NAMES[m[2]]}.", k): v for k, v in tensors.items()}
        theirs = dict(zip(renamed, tensors))  # the same order: sdtorch name -> the file's
        return renamed, lambda ours: prefix + theirs.get(ours, ours), ignored
    try:  # the original layout: renamed by the rules that read a whole checkpoint's VAE
        parts, _ = original_to_parts({VAE_PREFIX + k: v for k, v in tensors.items()}, config)
    except ArchitectureError as e:
        raise ArchitectureError(f"{file}: not a VAE of this {config.kind} model in the original layout or diffusers': "
                                f"{str(e).replace(VAE_PREFIX, prefix)}") from None

    def original_name(ours: str) -> str:
        """By keymaps' exact inverse (only for the few names an error message shows)."""
        try:
            (original,) = parts_to_original({"vae": {ours: parts["vae"].get(ours, torch.empty(0))}}, config)
        except (ArchitectureError, ValueError):
            return ours
        return prefix + original.removeprefix(VAE_PREFIX)

    return parts["vae"], original_name, ignored


def _check_fits(tensors: dict[str, Tensor], name: Callable[[str], str], expected: dict[str, Tensor], file: Path) -> None:
    """Every tensor the VAE has, of its shape and floating point, and no other: else an error naming them."""

    def shown(keys: list[str]) -> str:
        return ", ".join(name(k) for k in keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ArchitectureError(f"{file}: tensor(s) this model's VAE does not have: {shown(unexpected)}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ArchitectureError(f"{file}: missing {len(missing)} tensor(s) of this model's VAE: {shown(missing)}")
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape:
            raise ArchitectureError(
                f"{file}: tensor {name(key)} has shape {list(got.shape)}, this model's VAE needs "
                f"{list(want.shape)}: a VAE of another architecture")
        if want.is_floating_point() and not got.is_floating_point():
            raise ArchitectureError(f"{file}: tensor {name(key)} is {got.dtype}, not floating point")
