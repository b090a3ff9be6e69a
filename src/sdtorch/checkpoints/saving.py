"""`sdtorch.save`: a Pipeline to a diffusers folder or an original-layout single safetensors file.

Every write is atomic: a folder is written beside its destination and renamed into place; a file is
written to a temp file and renamed. A failure (full disk, bad path) leaves the destination as it was.
An existing destination is replaced only when asked (overwrite=True), and only if it is a model of the
same kind: a user's other files are never deleted to make room.

SDXL folders are written as diffusers' `StableDiffusionXLPipeline` (refiner: `StableDiffusionXLImg2ImgPipeline`,
inpainting: `StableDiffusionXLInpaintPipeline`) loads them: `text_encoder` (CLIPTextModel) and `text_encoder_2`
(CLIPTextModelWithProjection), `tokenizer` and `tokenizer_2` (padding with "!"), an Euler scheduler.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from ..configs import ModelConfig
from ..errors import CheckpointError, InvalidInputError
from ..models.tokenizer import CLIPTokenizer
from ..pipeline import Pipeline
from .io import atomic_write, detect_format, write_folder, write_json, write_safetensors
from .keymaps import parts_to_original
from .loading import (
    CONFIG_METADATA_KEY, DEFAULTS_INDEX_KEY, DEFAULTS_KEY, TOKENIZER_METADATA_KEY, single_file_tokenizer,
)
from ..request import FEW_STEP_DEFAULTS

FORMATS = ("diffusers", "single_file")
# What a diffusers Stable Diffusion folder holds (hub repositories add the README, licence and git files);
# a folder holding anything else is not one and is never replaced.
DIFFUSERS_ENTRIES = frozenset({
    "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor",
    "safety_checker", "text_encoder_2", "tokenizer_2", "image_encoder", "README.md", "LICENSE", "LICENSE.md",
    ".gitattributes", ".gitignore",
})
DIFFUSERS_VERSION = "0.30.0"  # the version model_index.json names: one whose layout these folders follow


def save(pipe: Pipeline, path: str | os.PathLike, format: str = "diffusers", overwrite: bool = False) -> Path:
    """Write `pipe` to `path` as a diffusers folder or an original-layout `.safetensors`; returns the path.

    An existing `path` is refused unless `overwrite`, and even then replaced only if it is a model of
    the same kind (see `check_destination`).
    """
    format = _format(format)
    if str(pipe.device) == "meta":
        raise InvalidInputError("this pipeline was loaded on the meta device (shapes only): there are no weights to save")
    path = Path(path).expanduser()
    check_destination(path, format, overwrite)
    if format == "single_file":
        _save_single_file(pipe, path, overwrite)
    else:
        _save_diffusers(pipe, path)
    return path


def check_destination(path: str | os.PathLike, format: str, overwrite: bool = False) -> None:
    """Raise InvalidInputError unless `save` may write `path` (cheap: call it before loading what to save).

    Free to write: nothing there, or an empty folder. With `overwrite`, also a model of the same kind: a
    diffusers folder holding nothing but what such a folder holds, or a safetensors / PyTorch checkpoint.
    """
    format, path = _format(format), Path(path).expanduser()
    exists = os.path.lexists(path)
    if format == "single_file" and path.is_dir():
        raise InvalidInputError(f"{path} is a folder; a single-file checkpoint needs a file name (*.safetensors)")
    if format == "diffusers" and exists and not path.is_dir():
        raise InvalidInputError(f"{path} is a file; a diffusers model is a folder")
    if not exists or (path.is_dir() and not any(path.iterdir())):
        return
    if not overwrite:
        raise InvalidInputError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    problem = _not_a_diffusers_model(path) if format == "diffusers" else _not_a_checkpoint(path)
    if problem:
        raise InvalidInputError(
            f"{path} is not replaced: {problem}. Only a model of the same kind is overwritten; choose another name"
        )


def _format(format: str) -> str:
    """The canonical spelling of a save format ("single-file" -> "single_file"); unknown ones are refused."""
    format = format.replace("-", "_")
    if format not in FORMATS:
        raise InvalidInputError(f"unknown save format {format!r}: use one of {', '.join(FORMATS)}")
    return format


def _not_a_diffusers_model(folder: Path) -> str | None:
    """Why `folder` is not a diffusers Stable Diffusion folder, or None when it is one."""
    names = {entry.name for entry in folder.iterdir()}
    if "model_index.json" not in names:
        return "it has no model_index.json, so it is not a diffusers model folder"
    others = sorted(names - DIFFUSERS_ENTRIES)
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        return f"it holds files a diffusers model does not ({shown})"
    return None


def _not_a_checkpoint(path: Path) -> str | None:
    """Why `path` is not a checkpoint file (safetensors, or a torch.save archive or pickle), or None."""
    if not path.is_file():
        return "it is not a regular file"
    try:
        kind = detect_format(path)
        if kind == "zip":  # any zip archive starts like this; torch.save's hold a data.pkl
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    return "it is a zip archive but not a PyTorch checkpoint"
    except (CheckpointError, zipfile.BadZipFile, OSError) as e:
        return f"it is not a checkpoint file ({e})"
    return None


def _save_single_file(pipe: Pipeline, path: Path, overwrite: bool) -> None:
    parts = {name: module.state_dict() for name, module in pipe.modules.items()}
    tensors = parts_to_original(parts, pipe.config)
    metadata = {CONFIG_METADATA_KEY: json.dumps(pipe.config.to_dict()), "format": "pt"}
    tokenizer = pipe.tokenizer.to_dict()
    if tokenizer != single_file_tokenizer({}, pipe.config).to_dict():  # not CLIP's: loading could not rebuild it
        metadata[TOKENIZER_METADATA_KEY] = json.dumps(tokenizer, ensure_ascii=False)
    if pipe.defaults.changes():
        metadata[DEFAULTS_KEY] = json.dumps(pipe.defaults.changes())
    try:  # write_safetensors writes straight into the temp file (nested atomic writes do)
        atomic_write(path, lambda tmp: write_safetensors(tensors, tmp, metadata), exclusive=not overwrite)
    except FileExistsError:
        raise InvalidInputError(f"{path} appeared while saving and was left as it is; pass overwrite=True") from None


def _save_diffusers(pipe: Pipeline, path: Path) -> None:
    write_folder(path, lambda staging: _write_diffusers_tree(pipe, staging))


def _write_diffusers_tree(pipe: Pipeline, root: Path) -> None:
    config = pipe.config
    index = _sdxl_model_index(config) if config.is_sdxl else _model_index(config)
    if pipe.defaults.changes():
        index[DEFAULTS_INDEX_KEY] = pipe.defaults.changes()
    write_json(index, root / "model_index.json")
    write_json(config.unet.to_diffusers(), root / "unet" / "config.json")
    write_safetensors(pipe.unet.state_dict(), root / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    write_json(config.vae.to_diffusers(), root / "vae" / "config.json")
    write_safetensors(pipe.vae.state_dict(), root / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    if config.is_sdxl:
        encoders = list(pipe.text_encoder.encoders)
        names = ("text_encoder_2",) if len(encoders) == 1 else ("text_encoder", "text_encoder_2")
        for i, (name, encoder) in enumerate(zip(names, encoders)):
            _write_text_encoder(encoder, root / name)
            tokenizer = pipe.tokenizer if i == 0 else _padding_with(pipe.tokenizer, encoder.config.pad_token_id)
            tokenizer.save(root / name.replace("text_encoder", "tokenizer"))
    else:
        _write_text_encoder(pipe.text_encoder, root / "text_encoder")
        pipe.tokenizer.save(root / "tokenizer")
    write_json(_scheduler_config(pipe), root / "scheduler" / "scheduler_config.json")


def _write_text_encoder(encoder, folder: Path) -> None:
    """A transformers CLIPTextModel (or, with a projection, CLIPTextModelWithProjection) folder."""
    write_json(encoder.config.to_diffusers(), folder / "config.json")
    # the `text_model.` prefix, as hub files carry it, loads in transformers 4 and 5 alike; the projection sits
    # beside the text model, as in CLIPTextModelWithProjection
    state = {k if k.startswith("text_projection.") else f"text_model.{k}": v for k, v in encoder.state_dict().items()}
    write_safetensors(state, folder / "model.safetensors", {"format": "pt"})


def _padding_with(tokenizer: CLIPTokenizer, pad_token_id: int) -> CLIPTokenizer:
    """`tokenizer` padding with the token of id `pad_token_id` (SDXL's tokenizer_2: "!", id 0)."""
    data = tokenizer.to_dict()
    token = next((t for t, i in data["vocab"].items() if i == pad_token_id), None)
    if token is None:
        raise InvalidInputError(f"the text encoder pads with id {pad_token_id}, which the tokenizer's vocabulary lacks")
    return CLIPTokenizer.from_dict({**data, "pad_token": token})


def _model_index(config: ModelConfig) -> dict:
    return {
        "_class_name": "StableDiffusionInstructPix2PixPipeline" if config.is_instruct_pix2pix
        else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _sdxl_model_index(config: ModelConfig) -> dict:
    """SDXL base: StableDiffusionXLPipeline (Inpaint for a 9-channel UNet); the refiner, bigG alone and 5 time ids
    with the aesthetic score: StableDiffusionXLImg2ImgPipeline."""
    refiner = config.family == "sdxl-refiner"
    if refiner:
        name = "StableDiffusionXLImg2ImgPipeline"
    else:
        name = "StableDiffusionXLInpaintPipeline" if config.is_inpainting else "StableDiffusionXLPipeline"
    clip = ["transformers", "CLIPTextModel"]
    index = {
        "_class_name": name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,  # as sdtorch's generation does: an empty negative prompt is zeros
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else clip,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if config.num_time_ids == 5 or name != "StableDiffusionXLPipeline":  # the img2img / inpaint pipelines take it
        index["requires_aesthetics_score"] = config.num_time_ids == 5
    return index


def _scheduler_config(pipe: Pipeline) -> dict:
    """The scheduler config SD ships (PNDM) or SDXL does (Euler), with this model's schedule, prediction type and
    timestep spacing (trailing for few-step models)."""
    schedule, sdxl = pipe.config.schedule, pipe.config.is_sdxl
    config = {
        "_class_name": "EulerDiscreteScheduler" if sdxl else "PNDMScheduler",
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": schedule.beta_schedule,
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": pipe.config.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "trailing" if pipe.defaults.scheduler == FEW_STEP_DEFAULTS.scheduler else "leading",
        "trained_betas": None,
    }
    if sdxl:
        config.update(interpolation_type="linear", use_karras_sigmas=False, sample_max_value=1.0)
    return config
