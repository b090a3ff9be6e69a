"""`sdtorch.save`: a Pipeline to a diffusers folder or an original-layout single safetensors file.

Every write is atomic: a folder is written beside its destination and renamed into place; a file is
written to a temp file and renamed. A failure (full disk, bad path) leaves the destination as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import CheckpointError, InvalidInputError
from ..pipeline import Pipeline
from .io import write_json, write_safetensors
from .keymaps import parts_to_original
from .loading import CONFIG_METADATA_KEY

FORMATS = ("diffusers", "single_file")


def save(pipe: Pipeline, path: str | os.PathLike, format: str = "diffusers") -> Path:
    """Write `pipe` to `path` as a diffusers folder or an original-layout `.safetensors`; returns the path."""
    format = format.replace("-", "_")
    if format not in FORMATS:
        raise InvalidInputError(f"unknown save format {format!r}: use one of {', '.join(FORMATS)}")
    if str(pipe.device) == "meta":
        raise InvalidInputError("this pipeline was loaded on the meta device (shapes only): there are no weights to save")
    path = Path(path).expanduser()
    if format == "single_file":
        _save_single_file(pipe, path)
    else:
        _save_diffusers(pipe, path)
    return path


def _save_single_file(pipe: Pipeline, path: Path) -> None:
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder; a single-file checkpoint needs a file name (*.safetensors)")
    parts = {name: module.state_dict() for name, module in pipe.modules.items()}
    tensors = parts_to_original(parts, pipe.config)
    metadata = {CONFIG_METADATA_KEY: json.dumps(pipe.config.to_dict()), "format": "pt"}
    write_safetensors(tensors, path, metadata)


def _save_diffusers(pipe: Pipeline, path: Path) -> None:
    if path.is_file():
        raise InvalidInputError(f"{path} is a file; a diffusers model is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_diffusers_tree(pipe, staging)
        _replace_folder(staging, path)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; nothing was changed") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(new: Path, dst: Path) -> None:
    """Rename `new` to `dst`; an existing `dst` is moved aside first and removed only once `new` is in place."""
    if not dst.exists():
        os.replace(new, dst)
        return
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
    try:
        os.replace(new, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_diffusers_tree(pipe: Pipeline, root: Path) -> None:
    config = pipe.config
    write_json(_model_index(), root / "model_index.json")
    write_json(config.unet.to_diffusers(), root / "unet" / "config.json")
    write_safetensors(pipe.unet.state_dict(), root / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    write_json(config.vae.to_diffusers(), root / "vae" / "config.json")
    write_safetensors(pipe.vae.state_dict(), root / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    write_json(config.text_encoder.to_diffusers(), root / "text_encoder" / "config.json")
    # the `text_model.` prefix, as hub files carry it, loads in transformers 4 and 5 alike
    text_state = {f"text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    write_safetensors(text_state, root / "text_encoder" / "model.safetensors", {"format": "pt"})
    pipe.tokenizer.save(root / "tokenizer")
    write_json(_scheduler_config(pipe), root / "scheduler" / "scheduler_config.json")


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _scheduler_config(pipe: Pipeline) -> dict:
    """SD's shipped scheduler config (PNDM, leading spacing), with this model's schedule and prediction type."""
    schedule = pipe.config.schedule
    return {
        "_class_name": "PNDMScheduler",
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": schedule.beta_schedule,
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": pipe.config.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }
