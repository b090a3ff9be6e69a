"""`sdtorch.load`: single files, diffusers folders and hub ids, loaded strictly into sdtorch's models.

Models are built on the meta device and filled with the checkpoint's tensors (`assign=True`), so a
load holds one copy of the weights, already in the target dtype.

SD1 / SD2 diffusers folders hold `unet`, `vae`, `text_encoder`, `tokenizer` and `scheduler`. SDXL base folders
add `text_encoder_2` (OpenCLIP bigG as transformers' `CLIPTextModelWithProjection`) and `tokenizer_2` (its pad
token is "!"); refiner folders have only the `_2` ones. The Pipeline keeps one tokenizer, the first encoder's
(base: `tokenizer`, refiner: `tokenizer_2`): `SDXLTextEncoder` pads each encoder's ids its own way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import reprlib
from pathlib import Path

import torch
from torch import nn

from ..configs import PREDICTION_TYPES, ModelConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import ArchitectureError, CheckpointError, InvalidInputError, MissingKeysError
from ..models.clip import CLIPTextEncoder
from ..models.sdxl_text import SDXLTextEncoder
from ..models.tokenizer import CLIPTokenizer
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..pipeline import LoadReport, Pipeline
from ..request import FEW_STEP_DEFAULTS, ModelDefaults
from .detect import infer_config
from .io import describe_error, detect_format, read_checkpoint, read_json_object, read_shapes, weight_dtype
from .keymaps import original_to_parts

CONFIG_METADATA_KEY = "sdtorch_config"
TOKENIZER_METADATA_KEY = "sdtorch_tokenizer"  # a vocabulary other than CLIP's travels in the file (JSON)
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes"  # trained by configs/shapes.toml
# its ControlNet on canny edge maps (scripts/shapes_controlnet.py), a diffusers ControlNet folder
SHAPES_CONTROLNET = DEFAULT_MODEL.parent / "shapes-controlnet"
# the model's own request defaults where they differ from ModelDefaults() (the shapes model's CFG 4), as JSON in a
# single file's metadata, and as an object in a diffusers folder's model_index.json (diffusers skips "_" keys)
DEFAULTS_KEY = "sdtorch_defaults"
DEFAULTS_INDEX_KEY = "_sdtorch_defaults"
SD2_EPSILON_GLOBAL_STEP = "875000"  # the 512px SD2 base checkpoint; other SD2 files predict v (diffusers' rule)

# Weight files of a diffusers folder's parts, in order of preference.
PART_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
PART_WEIGHT_FILES["text_encoder_2"] = PART_WEIGHT_FILES["text_encoder"]
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # a missing one is a file, not a hub id
HUB_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "tokenizer/*",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "tokenizer_2/*",  # SDXL
]
MODEL_CLASSES: dict[str, type[nn.Module]] = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder}
# The subfolders an SDXL diffusers folder holds its text encoders and tokenizers in, in the conditioner's order.
SDXL_TEXT_FOLDERS = {"sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
                     "sdxl-refiner": (("text_encoder_2", "tokenizer_2"),)}


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
    dtype = weight_dtype(dtype)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InvalidInputError(f"device {device!r} is not a torch device ({describe_error(e)})") from None
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidInputError(f"source must be a path or a hub id, not a {type(source).__name__}")
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return _load_single_file(path, dtype, device, prediction_type, config)
        if path.is_dir():
            return _load_diffusers_folder(path, dtype, device, prediction_type, str(source))
        if path.exists():
            raise CheckpointError(f"{source} is neither a regular file nor a folder")
        if _looks_like_hub_id(str(source)):
            return _load_diffusers_folder(_download(str(source)), dtype, device, prediction_type, str(source))
    except CheckpointError as e:
        if str(source) not in str(e):  # most messages name the file at fault; the others get the model's name
            e.args = (f"{source}: {e}",)
        raise
    raise CheckpointError(f"no such file or folder: {source}")


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and "\\" not in source
            and not source.lower().endswith(CHECKPOINT_SUFFIXES))


def _download(repo_id: str) -> Path:
    """Fetch the files of HUB_FILES into huggingface_hub's cache; returns the snapshot folder.

    huggingface_hub looks a repo up with no timeout, so a hub that accepts the connection and never
    answers would hang the load: the look-up is made here, bounded by HF_HUB_ETAG_TIMEOUT (10 s by
    default), and that commit's files are then fetched (each request bounded by huggingface_hub's own
    timeouts, HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT). When the hub cannot be reached
    (offline, HF_HUB_OFFLINE=1, a timeout, the hub failing), a copy in the cache is used.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError

    try:
        revision = huggingface_hub.HfApi().model_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
    except (RepositoryNotFoundError, HFValidationError) as e:  # gated ones too: the hub answered, no cache helps
        raise _hub_error(repo_id, e) from None
    except Exception as unreachable:  # no network, offline mode, a timeout, the hub failing: try the cache
        return _cached_snapshot(repo_id, unreachable)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # huggingface_hub raises many kinds: a dropped connection, a full disk, ...
        raise _hub_error(repo_id, e) from None


def _cached_snapshot(repo_id: str, unreachable: Exception) -> Path:
    """The copy of `repo_id` in huggingface_hub's cache, used when the hub could not be asked (`unreachable`)."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached, or cached only in part
        raise CheckpointError(
            f"could not reach the Hugging Face hub for {repo_id!r} ({describe_error(unreachable)}) and it is not in "
            "the local cache: check the network (HF_ENDPOINT, a proxy; a slow link may need a larger "
            "HF_HUB_ETAG_TIMEOUT) or pass a local file or folder"
        ) from None


def _hub_error(repo_id: str, error: Exception) -> CheckpointError:
    """Why fetching `repo_id` from the hub failed, and what to do about it."""
    from huggingface_hub.utils import GatedRepoError, HFValidationError, RepositoryNotFoundError

    if isinstance(error, HFValidationError):
        return CheckpointError(f"no such file or folder: {repo_id} (nor is it a valid hub id: org/name)")
    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(error, GatedRepoError):
        return CheckpointError(f"{repo_id!r} is gated on the hub: accept its terms at https://huggingface.co/{repo_id} "
                               f"and {login}")
    if isinstance(error, RepositoryNotFoundError):
        return CheckpointError(f"no such file or folder, and no model {repo_id!r} on the hub "
                               f"(if it is private, {login})")
    return CheckpointError(f"could not fetch {repo_id!r} from the hub ({describe_error(error)}); "
                           "try again, or pass a local file or folder instead")


def _load_single_file(
    path: Path, dtype: torch.dtype, device, prediction_type: str | None, config: ModelConfig | None
) -> Pipeline:
    if str(device) == "meta" and detect_format(path) == "safetensors":
        tensors, metadata = read_shapes(path)
    else:
        tensors, metadata = read_checkpoint(path, dtype)
    origin = "user" if prediction_type else "detected"
    if config is None and CONFIG_METADATA_KEY in metadata:
        config = _metadata_config(metadata[CONFIG_METADATA_KEY])
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
    report = LoadReport(str(path), "single_file", origin, ignored)
    pipe = _assemble(parts, config, single_file_tokenizer(metadata, config), dtype, device, report)
    if DEFAULTS_KEY in metadata:
        where = f"{path}: metadata {DEFAULTS_KEY}"
        try:
            values = json.loads(metadata[DEFAULTS_KEY])
        except ValueError:
            raise ArchitectureError(f"{where} is not valid JSON") from None
        pipe.defaults = _model_defaults(values, where)
    return pipe


def _metadata_config(text: str) -> ModelConfig:
    """The ModelConfig sdtorch stores in a single file's metadata; ArchitectureError when it is malformed."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArchitectureError(f"the file's {CONFIG_METADATA_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ArchitectureError(f"the file's {CONFIG_METADATA_KEY} metadata is not a JSON object")
    try:
        return ModelConfig.from_dict(data, source=f"the file's {CONFIG_METADATA_KEY} metadata")
    except InvalidInputError as e:
        raise ArchitectureError(str(e)) from None


def single_file_tokenizer(metadata: dict[str, str], config: ModelConfig) -> CLIPTokenizer:
    """The tokenizer a single file carries in its metadata (sdtorch stores any but CLIP's own), else CLIP's."""
    if TOKENIZER_METADATA_KEY not in metadata:
        return CLIPTokenizer.default(pad_token="<|endoftext|>" if config.text_encoder.pad_token_id == 49407 else "!")
    try:
        data = json.loads(metadata[TOKENIZER_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the file's tokenizer metadata is not valid JSON ({e})") from None
    return CLIPTokenizer.from_dict(data)


def _load_diffusers_folder(
    folder: Path, dtype: torch.dtype, device, prediction_type: str | None, source: str
) -> Pipeline:
    missing = [p for p in ("unet", "vae") if not (folder / p).is_dir()]
    sdxl = (folder / "text_encoder_2").is_dir()
    if not sdxl:
        missing += [p for p in ("text_encoder", "tokenizer") if not (folder / p).is_dir()]
    if missing:
        raise CheckpointError(
            f"{source} is a folder but not a diffusers Stable Diffusion model: no {', '.join(missing)} subfolder(s)"
        )
    unet_file, vae_file = folder / "unet" / "config.json", folder / "vae" / "config.json"
    unet_cfg = UNetConfig.from_diffusers(read_json_object(unet_file), source=str(unet_file))
    vae_cfg = VAEConfig.from_diffusers(read_json_object(vae_file), source=str(vae_file))
    if unet_cfg.has_addition and not sdxl:
        raise ArchitectureError(f"{unet_file}: an SDXL UNet (addition_embed_type text_time), but {folder} has no "
                                "text_encoder_2 subfolder (SDXL's OpenCLIP bigG text encoder)")
    if sdxl:
        # a refiner has bigG alone: no text_encoder (its model_index.json names none)
        family = "sdxl" if (folder / "text_encoder").is_dir() else "sdxl-refiner"
        text_folders = SDXL_TEXT_FOLDERS[family]
        absent = [name for pair in text_folders for name in pair if not (folder / name).is_dir()]
        if absent:
            raise CheckpointError(f"{source} is an {family} diffusers folder without its {', '.join(absent)} "
                                  "subfolder(s)")
    else:
        text_folders = (("text_encoder", "tokenizer"),)
    tokenizers = [CLIPTokenizer.from_folder(folder / tok) for _, tok in text_folders]
    text_cfgs = []
    for i, ((text, tok), tokenizer) in enumerate(zip(text_folders, tokenizers)):
        text_file = folder / text / "config.json"
        cfg = TextEncoderConfig.from_diffusers(read_json_object(text_file), pad_token_id=tokenizer.pad_token_id,
                                               source=str(text_file), hidden_state_output=sdxl)
        if sdxl and i == len(text_folders) - 1:  # bigG's pooled embedding needs its projection, whatever config says
            cfg = dataclasses.replace(cfg, with_projection=True)
        text_cfgs.append(cfg)
    if sdxl:
        _check_same_vocabulary(folder, text_folders, tokenizers)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json_object(scheduler_file) if scheduler_file.is_file() else {}
    origin = "user" if prediction_type else "file"
    prediction_type = prediction_type or scheduler.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ArchitectureError(f"{scheduler_file}: prediction_type {reprlib.repr(prediction_type)} is not supported "
                                f"(sdtorch runs {' and '.join(PREDICTION_TYPES)} models)")
    if not sdxl:
        # OpenCLIP (SD2) uses GELU, OpenAI CLIP QuickGELU
        family = "sd2" if text_cfgs[0].activation == "gelu" else "sd1"
    config = ModelConfig(
        family=family,
        prediction_type=prediction_type,
        unet=unet_cfg,
        vae=vae_cfg,
        text_encoder=text_cfgs[0],
        text_encoder_2=text_cfgs[1] if len(text_cfgs) > 1 else None,
        schedule=ScheduleConfig.from_diffusers(scheduler, source=str(scheduler_file)),
    )
    parts, ignored = {}, []
    for part in ("unet", "vae"):
        parts[part] = _read_part(folder / part, part, dtype, device)
    parts["text_encoder"] = {}
    for i, ((text, _), cfg) in enumerate(zip(text_folders, text_cfgs)):
        tensors, skipped = _normalise_text_encoder_keys(_read_part(folder / text, text, dtype, device),
                                                        keep_projection=cfg.with_projection)
        prefix = f"encoders.{i}." if sdxl else ""
        parts["text_encoder"].update({prefix + k: v for k, v in tensors.items()})
        ignored += [f"{text}/{k}" for k in skipped]
    tokenizer = tokenizers[0]
    report = LoadReport(source, "diffusers", origin, ignored)
    pipe = _assemble(parts, config, tokenizer, dtype, device, report)
    index = _model_index(folder)
    if DEFAULTS_INDEX_KEY in index:
        pipe.defaults = _model_defaults(index[DEFAULTS_INDEX_KEY], f"{folder / 'model_index.json'}: {DEFAULTS_INDEX_KEY}")
    elif is_few_step_scheduler(scheduler):  # Turbo ships Euler Ancestral, Lightning plain Euler
        euler = scheduler.get("_class_name") == "EulerDiscreteScheduler"
        pipe.defaults = dataclasses.replace(FEW_STEP_DEFAULTS, sampler_name="Euler") if euler else FEW_STEP_DEFAULTS
    return pipe


def is_few_step_scheduler(scheduler: dict) -> bool:
    """Whether a diffusers scheduler config is a few-step distilled model's (SDXL Turbo / Lightning / Hyper-SD):
    trailing timesteps on the ordinary schedule (a zero-terminal-SNR model also spaces them trailing, but keeps
    ordinary steps and CFG)."""
    return scheduler.get("timestep_spacing") == "trailing" and not scheduler.get("rescale_betas_zero_snr", False)


def _check_same_vocabulary(folder: Path, text_folders, tokenizers: list[CLIPTokenizer]) -> None:
    """SDXL's encoders read the ids of the first tokenizer: the others must agree with it on every id but padding."""
    first = tokenizers[0]
    for (_, name), other in zip(text_folders[1:], tokenizers[1:]):
        same = (other.vocab_size, other.bos_token_id, other.eos_token_id, other.max_length) == \
            (first.vocab_size, first.bos_token_id, first.eos_token_id, first.max_length)
        if not same:
            raise CheckpointError(f"{folder / name}: its vocabulary or special tokens differ from "
                                  f"{folder / text_folders[0][1]}'s; sdtorch tokenizes once for both SDXL encoders")


def _model_index(folder: Path) -> dict:
    """model_index.json's settings, or {} where it is missing or unreadable (diffusers needs it, sdtorch does not)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _model_defaults(values: object, where: str) -> ModelDefaults:
    """The request defaults a model's files record; bad ones are an ArchitectureError naming `where`."""
    try:
        return ModelDefaults.from_dict(values, where)
    except InvalidInputError as error:
        raise ArchitectureError(str(error)) from None


def _read_part(folder: Path, part: str, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    for name in PART_WEIGHT_FILES[part]:
        file = folder / name
        if not file.is_file():
            continue
        if str(device) == "meta" and detect_format(file) == "safetensors":
            return read_shapes(file)[0]
        return read_checkpoint(file, dtype)[0]
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(PART_WEIGHT_FILES[part])})")


def _normalise_text_encoder_keys(
    tensors: dict[str, torch.Tensor], keep_projection: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Accept files written by transformers 4 (`text_model.` prefix) and 5 (none; `CLIPTextModelWithProjection`
    keeps it); drop unused entries: position ids, and `text_projection` unless the encoder uses it (SDXL's bigG)."""
    kept, skipped = {}, []
    for key, value in tensors.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids") or (name.startswith("text_projection") and not keep_projection):
            skipped.append(key)
        else:
            kept[name] = value
    return kept, skipped


def _assemble(
    parts: dict[str, dict[str, torch.Tensor]], config: ModelConfig, tokenizer: CLIPTokenizer,
    dtype: torch.dtype, device, report: LoadReport,
) -> Pipeline:
    part_configs = {"unet": config.unet, "vae": config.vae, "text_encoder": config.text_encoder}
    classes = dict(MODEL_CLASSES)
    if config.is_sdxl:  # its encoders side by side, state dict keys `encoders.{i}.*`
        classes["text_encoder"], part_configs["text_encoder"] = SDXLTextEncoder, config.text_encoders
    models = {
        name: build_model(cls, part_configs[name], parts[name], name, dtype, device)
        for name, cls in classes.items()
    }
    return Pipeline(tokenizer, models["text_encoder"], models["unet"], models["vae"], config, report)


def build_model(
    cls: type[nn.Module], config, tensors: dict[str, torch.Tensor], part: str,
    dtype: torch.dtype, device=None, source: str | None = None,
) -> nn.Module:
    """Build `cls(config)` on the meta device and fill it strictly with `tensors` (no copy when dtypes agree);
    errors name `source` (the file or folder) when given."""
    try:
        return _build_model(cls, config, tensors, part, dtype, device)
    except CheckpointError as e:
        if source is not None and source not in str(e):
            e.args = (f"{source}: {e}",)
        raise


def _build_model(
    cls: type[nn.Module], config, tensors: dict[str, torch.Tensor], part: str, dtype: torch.dtype, device,
) -> nn.Module:
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
        raise ArchitectureError(f"{part}: {len(wrong)} tensor shape(s) differ from the config (file vs config): "
                                f"{'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    not_float = [f"{k} ({tensors[k].dtype})" for k, v in expected.items()
                 if v.is_floating_point() and not tensors[k].is_floating_point()]
    if not_float:
        raise ArchitectureError(f"{part}: weights that are not floating point: {', '.join(not_float[:5])}")
    tensors = {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    if device is not None and str(device) != "meta":
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as e:  # no such device, no CUDA in this torch, out of its memory
            raise InvalidInputError(f"cannot move the {part} to {device}: {describe_error(e)}") from None
    return model.eval().requires_grad_(False)
