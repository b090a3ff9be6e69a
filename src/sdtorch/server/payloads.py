"""From an A1111 txt2img / img2img payload to a planned job: the model, and one validated GenerationRequest per
iteration (`n_iter`), before anything is queued. Everything a client can get wrong is refused here:

    an unknown sampler                  400 "Sampler not found"
    an unknown model title              400 "Model not found" (titles come from the scanned folders only)
    a value out of range, over a limit  422 naming the field and the limit (GenerationRequest.validate)
    undecodable base64, not an image    422
    a selectable script (script_name)   422 "Script not found" (sdtorch has none)
    a bad ControlNet unit               422 naming alwayson_scripts.controlnet.args[i] and the field
                                        (controlnet_units.py; its model only from --controlnet-dir, an
                                        IP-Adapter's CLIP vision tower only from --clip-vision-dir)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ..errors import InvalidInputError
from ..request import RESIZE_MODES, GenerationRequest, Limits, random_seed
from ..sampling.samplers import resolve, sampler_names
from .catalog import Checkpoint, Checkpoints, ClipVisionFiles, ControlNetModels
from .controlnet_units import NO_DETECTMAP_OPTION, DetectedMap, controlnet_units
from .encoding import image_bytes
from .errors import ApiError
from .schemas import HIRES_FIELDS, IMG2IMG_TABLE, TXT2IMG_TABLE

MODEL_OPTION = "sd_model_checkpoint"
# A1111's settings that are request fields here: option -> GenerationRequest field (set for every later request by
# POST /options, or for one by override_settings)
REQUEST_OPTIONS = {"CLIP_stop_at_last_layers": "clip_skip", "eta_noise_seed_delta": "eta_noise_seed_delta"}
_SAME = (None, "", "Use same sampler", "Use same scheduler", "Use same checkpoint")  # A1111's "as the first pass"


@dataclass
class GenerationJob:
    """A planned txt2img / img2img job."""

    kind: str  # "txt2img" | "img2img"
    checkpoint: Checkpoint
    requests: list[GenerationRequest]  # one per iteration; image i of the job has seed + i
    send_images: bool
    save_images: bool
    parameters: dict[str, Any]  # the request as the response echoes it
    lasting_options: dict[str, Any]  # override_settings that stay set after the job (restore_afterwards false)
    detected_maps: list[DetectedMap] = field(default_factory=list)  # the units whose maps follow the images
    warnings: list[str] = field(default_factory=list)  # what the planning changed (added to info's warnings)

    def image_count(self) -> int:
        return sum(request.image_count() for request in self.requests)


def check_sampler(name: str) -> None:
    try:
        resolve(name)
    except InvalidInputError:
        raise ApiError(400, f"Sampler not found: {name!r}; valid names: {', '.join(sampler_names())}") from None


def _resize_mode(value: int | str) -> str:
    """A1111's number (0, 1, 2) or sdtorch's name; 3 (latent upscale) is not supported."""
    if isinstance(value, str):
        return value
    if 0 <= value < len(RESIZE_MODES):
        return RESIZE_MODES[value]
    raise InvalidInputError(f"resize_mode {value} is not supported: use 0 (just resize), 1 (crop and resize) "
                            "or 2 (resize and fill)")


def _request(payload: BaseModel, kind: str, options: dict[str, Any]) -> GenerationRequest:
    """The payload's generation settings as a GenerationRequest (not yet validated); `options`: the settings in
    force for it (REQUEST_OPTIONS among them)."""
    table = TXT2IMG_TABLE if kind == "txt2img" else IMG2IMG_TABLE
    values = {name: getattr(payload, name) for name in table}
    values["sampler_name"] = payload.sampler_name or payload.sampler_index  # A1111: the legacy field as fallback
    check_sampler(values["sampler_name"])
    values |= {field: options[option] for option, field in REQUEST_OPTIONS.items()}
    if kind == "txt2img":
        strength = values.pop("denoising_strength")  # txt2img's is the hires fix's
        if payload.enable_hr:
            values.update(enable_hr=True, hr_denoising_strength=strength)
            for name in ("hr_sampler_name", "hr_scheduler"):  # A1111's "Use same sampler": the first pass's
                values[name] = None if values[name] in _SAME else values[name]
        else:  # A1111 clients send the hires settings with the fix off
            values = {name: value for name, value in values.items() if name not in HIRES_FIELDS}
    else:
        values["resize_mode"] = _resize_mode(values["resize_mode"])
        values["init_image"] = image_bytes(payload.init_images[0], "init_images[0]")
        if payload.mask:
            values["mask"] = image_bytes(payload.mask, "mask")
    return GenerationRequest.from_kwargs(**values)


def _unsupported(payload: BaseModel, request: GenerationRequest) -> list[str]:
    """Warnings for the A1111 features a payload asks for that sdtorch does not have; the job runs without them."""
    asked = []
    if payload.restore_faces:
        asked.append("restore_faces: sdtorch has no face restoration models; the images are not restored")
    if request.hires is not None and payload.hr_checkpoint_name not in _SAME:
        asked.append(f"hr_checkpoint_name {payload.hr_checkpoint_name!r}: the hires pass runs on the first pass's "
                     "model")
    return asked


def _iterations(request: GenerationRequest, n_iter: int, limits: Limits) -> list[GenerationRequest]:
    """One validated request per iteration, seeds running on over the whole job (-1: one random seed for all)."""
    request.validate(limits)
    per_iteration = request.image_count()
    total = per_iteration * n_iter
    if total > limits.max_batch:
        raise InvalidInputError(f"{total} images (n_iter {n_iter} x {per_iteration}) are over the limit "
                                f"max_batch={limits.max_batch}")
    seed = random_seed(total) if request.seed == -1 else request.seed
    return [request.replace(seed=seed + k * per_iteration).validate(limits) for k in range(n_iter)]


def plan_generation(payload: BaseModel, kind: str, checkpoints: Checkpoints, options: dict[str, Any],
                    limits: Limits, controlnets: ControlNetModels | None = None,
                    clip_vision: ClipVisionFiles | None = None) -> GenerationJob:
    """Check a payload and plan its job against the server's models (and ControlNets, IP-Adapters and their CLIP
    vision towers), options (with the payload's override_settings applied for this job) and limits."""
    if payload.script_name:  # A1111 refuses a script it lacks the same way; ignoring it would lose the work asked
        raise ApiError(422, f"Script not found: {payload.script_name!r} (sdtorch has no selectable scripts)")
    overrides = payload.override_settings
    checkpoint = checkpoints.find(str(overrides.get(MODEL_OPTION, options[MODEL_OPTION])))
    request = _request(payload, kind, {**options, **overrides})
    control = controlnet_units(payload.alwayson_scripts, controlnets or ControlNetModels(None), request, limits,
                               clip_vision)
    request = request.replace(controlnet=control.units, ip_adapter=control.ip_adapter)
    no_maps = overrides.get(NO_DETECTMAP_OPTION, options.get(NO_DETECTMAP_OPTION, False))
    if not isinstance(no_maps, bool):
        raise InvalidInputError(f"{NO_DETECTMAP_OPTION} must be true or false, not {no_maps!r}")
    parameters = {**payload.model_dump(), "sampler_name": request.sampler_name}
    if kind == "img2img" and not payload.include_init_images:
        parameters.update(init_images=None, mask=None)
    lasting = {} if payload.override_settings_restore_afterwards else dict(overrides)
    if MODEL_OPTION in lasting:
        lasting[MODEL_OPTION] = checkpoint.title
    return GenerationJob(kind, checkpoint, _iterations(request, payload.n_iter, limits), payload.send_images,
                         payload.save_images, parameters, lasting,
                         detected_maps=[] if no_maps else control.detected_maps,
                         warnings=[*control.warnings, *_unsupported(payload, request)])
