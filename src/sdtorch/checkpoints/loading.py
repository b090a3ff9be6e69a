"""`sdtorch.load`: single files, diffusers folders and hub ids, loaded strictly into sdtorch's models.

Models are built on the meta device and filled with the checkpoint's tensors (`assign=True`), so a
load holds one copy of the weights, already in the target dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..configs import ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import ArchitectureError, CheckpointError, InvalidInputError, MissingKeysError
from ..models.clip import CLIPTextEncoder
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..pipeline import LoadReport, Pipeline
from .detect import infer_config
from .io import detect_format, read_checkpoint, read_pickle_checkpoint, read_safetensors, read_shapes
from .keymaps import original_to_parts

PREDICTION_TYPES = ("epsilon", "v_prediction")
CONFIG_METADATA_KEY = "sdtorch_config"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes"  # trained by configs/shapes.toml
SD2_EPSILON_GLOBAL_STEP = "875000"  # the 512px SD2 base checkpoint; other SD2 files predict v (diffusers' rule)

# Weight files of a diffusers folder's parts, in order of preference.
PART_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
HUB_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
]
MODEL_CLASSES: dict[str, type[nn.Module]] = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder}


def load(
    source: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    prediction_type: str | None = None,
    config: ModelConfig | None = None,
) -> Pipeline:
    """Load a Stable Diffusion model into a `Pipeline`.

    Args:
        source: None for sdtorch's own shapes-world model (shipped with the package, see configs/shapes.toml),
            an original single file (`.safetensors`, or `.ckpt` read with weights_only), a diffusers
            folder, or a hub id (`org/name`, downloaded with huggingface_hub when online).
        dtype: weight dtype (default float32); tensors are cast while reading, one at a time.
        device: where the models live (default CPU). "meta" reads only shapes, for inspection.
        prediction_type: "epsilon" or "v_prediction", overriding what was detected.
        config: the architecture, for single files whose sizes do not follow SD's conventions.
    """
    if source is None:
        if not DEFAULT_MODEL.is_dir():
            raise CheckpointError(f"the default model is missing from this installation ({DEFAULT_MODEL}); pass a model")
        source = DEFAULT_MODEL
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InvalidInputError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    dtype = dtype or torch.float32
    path = Path(source).expanduser()
    if path.is_file():
        return _load_single_file(path, dtype, device, prediction_type, config)
    if path.is_dir():
        return _load_diffusers_folder(path, dtype, device, prediction_type, str(source))
    if _looks_like_hub_id(str(source)):
        return _load_diffusers_folder(_download(str(source)), dtype, device, prediction_type, str(source))
    raise CheckpointError(f"no such file or folder: {source}")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # huggingface_hub raises many kinds: offline, not found, gated, ...
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "pass a local file or folder instead"
        ) from None


def _load_single_file(
    path: Path, dtype: torch.dtype, device, prediction_type: str | None, config: ModelConfig | None
) -> Pipeline:
    if str(device) == "meta" and detect_format(path) == "safetensors":
        tensors, metadata = read_shapes(path)
    else:
        tensors, metadata = read_checkpoint(path, dtype)
    origin = "user" if prediction_type else "detected"
    if config is None and CONFIG_METADATA_KEY in metadata:
        config = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        origin = "user" if prediction_type else "file"
    elif config is None:
        guess = prediction_type
        if guess is None and metadata.get("global_step") == SD2_EPSILON_GLOBAL_STEP:
            guess = "epsilon"
        config = infer_config(tensors, prediction_type=guess)
    if prediction_type:
        config = config.replace(prediction_type=prediction_type)
    parts, ignored = original_to_parts(tensors, config)
    del tensors
    pad = "<|endoftext|>" if config.text_encoder.pad_token_id == 49407 else "!"
    report = LoadReport(str(path), "single_file", origin, ignored)
    return _assemble(parts, config, CLIPTokenizer.default(pad_token=pad), dtype, device, report)


def _load_diffusers_folder(
    folder: Path, dtype: torch.dtype, device, prediction_type: str | None, source: str
) -> Pipeline:
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / p).is_dir()]
    if missing:
        raise CheckpointError(
            f"{source} is a folder but not a diffusers Stable Diffusion model: no {', '.join(missing)} subfolder(s)"
        )
    unet_cfg = UNetConfig.from_diffusers(_read_json(folder / "unet" / "config.json"))
    vae_cfg = VAEConfig.from_diffusers(_read_json(folder / "vae" / "config.json"))
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    text_cfg = TextEncoderConfig.from_diffusers(
        _read_json(folder / "text_encoder" / "config.json"), pad_token_id=tokenizer.pad_token_id
    )
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    origin = "user" if prediction_type else "file"
    config = ModelConfig(
        family="sd2" if text_cfg.activation == "gelu" else "sd1",  # OpenCLIP (SD2) uses GELU, OpenAI CLIP QuickGELU
        prediction_type=prediction_type or scheduler.get("prediction_type", "epsilon"),
        unet=unet_cfg,
        vae=vae_cfg,
        text_encoder=text_cfg,
        schedule=ScheduleConfig(
            num_train_timesteps=scheduler.get("num_train_timesteps", 1000),
            beta_start=scheduler.get("beta_start", 0.00085),
            beta_end=scheduler.get("beta_end", 0.012),
            beta_schedule=scheduler.get("beta_schedule", "scaled_linear"),
        ),
    )
    parts, ignored = {}, []
    for part in MODEL_CLASSES:
        tensors = _read_part(folder / part, part, dtype, device)
        if part == "text_encoder":
            tensors, skipped = _normalise_text_encoder_keys(tensors)
            ignored += [f"text_encoder/{k}" for k in skipped]
        parts[part] = tensors
    report = LoadReport(source, "diffusers", origin, ignored)
    return _assemble(parts, config, tokenizer, dtype, device, report)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _read_part(folder: Path, part: str, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    for name in PART_WEIGHT_FILES[part]:
        file = folder / name
        if not file.is_file():
            continue
        if detect_format(file) == "safetensors":
            return read_shapes(file)[0] if str(device) == "meta" else read_safetensors(file, dtype)[0]
        state = read_pickle_checkpoint(file)
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(PART_WEIGHT_FILES[part])})")


def _normalise_text_encoder_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Accept files written by transformers 4 (`text_model.` prefix) and 5 (none); drop unused entries."""
    kept, skipped = {}, []
    for key, value in tensors.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids") or name.startswith("text_projection"):
            skipped.append(key)
        else:
            kept[name] = value
    return kept, skipped


def _assemble(
    parts: dict[str, dict[str, torch.Tensor]], config: ModelConfig, tokenizer: CLIPTokenizer,
    dtype: torch.dtype, device, report: LoadReport,
) -> Pipeline:
    part_configs = {"unet": config.unet, "vae": config.vae, "text_encoder": config.text_encoder}
    models = {
        name: build_model(cls, part_configs[name], parts[name], name, dtype, device)
        for name, cls in MODEL_CLASSES.items()
    }
    return Pipeline(tokenizer, models["text_encoder"], models["unet"], models["vae"], config, report)


def build_model(
    cls: type[nn.Module], config, tensors: dict[str, torch.Tensor], part: str,
    dtype: torch.dtype, device=None,
) -> nn.Module:
    """Build `cls(config)` on the meta device and fill it strictly with `tensors` (no copy when dtypes agree)."""
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise MissingKeysError(part, missing)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ArchitectureError(f"{part}: checkpoint has tensors the model does not: {', '.join(unexpected[:10])}")
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise ArchitectureError(f"{part}: tensor shapes differ from the config: {'; '.join(wrong[:5])}")
    tensors = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if device is not None and str(device) != "meta":
        model.to(device)
    return model.eval().requires_grad_(False)
