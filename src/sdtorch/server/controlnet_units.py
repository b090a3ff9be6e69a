"""The A1111 ControlNet extension's units in a txt2img / img2img payload, and the detected maps it sends back.

    "alwayson_scripts": {"controlnet": {"args": [
        {"enabled": true, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "image": "<base64>",
         "weight": 1.0, "resize_mode": "Crop and Resize" | 1, "control_mode": "Balanced" | 0, ...}, ...]}}

Read as the extension reads them (its internal_controlnet/args.py, `ControlNetUnit.from_dict`): unknown keys are
ignored; `enabled` is false unless given (disabled units are skipped, after their fields are checked); the legacy
keys `input_image`, `guidance`, `lowvram` and `mask_image` stand for `image`, `guidance_end`, `low_vram` and
`mask`; a processor_res / threshold_a / threshold_b outside the module's slider range becomes its default;
`image` is base64, {"image": ..., "mask": ...} or [image, mask]; a non-blank mask on a module that takes none is the
"canvas scribble" (the mask becomes the control image); an inpaint module without a mask gets an empty one; without
an image, img2img's init image (and its resize mode and mask) is the control image. A model is named by a title of
/controlnet/model_list or its name, found only in --controlnet-dir (never opened by path). The extension's
A1111 takes the first `control_net_unit_count` (3) args only; more enabled units are refused here.

A unit whose module is one of the extension's IP-Adapter modules (ip_adapter_modules.py: ip-adapter-auto,
ip-adapter_clip_h...) is an IP-Adapter unit: its model an IP-Adapter file of --controlnet-dir, its image encoder the
module's CLIP vision tower from --clip-vision-dir (clip_h.pth, clip_g.pth), its weight the unit's; it goes to the
request's `ip_adapter` list. As in the extension its resize mode, control mode and sliders do nothing, img2img's
image stands in for a missing image, and its "detected map" is the input image itself. A ControlNet module with an
IP-Adapter model, or an IP-Adapter module with another model, is refused.

Refused rather than ignored, as sdtorch cannot honour them: preprocessors that run a network (send their map with
module "none"), several images a unit (IP-Adapter's), a CLIP mask (IP-Adapter units with a non-empty mask),
guidance_start / guidance_end on IP-Adapter units, advanced_weighting, effective_region_mask, ipadapter_input,
batch / merge input modes, and hr_option other than "Both" with the hires fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..control import control_map
from ..errors import InvalidInputError
from ..images import load_image, resize_image
from ..preprocessors import Preprocessor, get_preprocessor
from ..request import CONTROL_MODES, RESIZE_MODES, ControlNetUnit, GenerationRequest, IPAdapterUnit, Limits
from .catalog import ClipVisionFiles, ControlNetModel, ControlNetModels
from .encoding import image_bytes
from .ip_adapter_modules import AUTO, IPAdapterModule, auto_module, find_ip_module

log = logging.getLogger("sdtorch.server")

SCRIPT = "controlnet"  # the key of alwayson_scripts (A1111 matches script titles in any case)
UNIT_COUNT = 3  # the extension's default control_net_unit_count: A1111 passes it this many args
NO_DETECTMAP_OPTION = "control_net_no_detectmap"  # the extension's setting: true -> no detected maps in responses
RESIZE_TITLES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # the extension's ResizeMode, 0 1 2
_RESIZE_ALIASES = {"inner fit (scale to fit)": "Crop and Resize", "outer fit (shrink to fit)": "Resize and Fill",
                   "scale to fit (inner fit)": "Crop and Resize", "envelope (outer fit)": "Resize and Fill",
                   "just resize (latent upscale)": "Just Resize"}
HR_OPTIONS = ("Both", "Low res only", "High res only")
_LEGACY_KEYS = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "mask_image": "mask"}
SLIDER_FIELDS = ("processor_res", "threshold_a", "threshold_b")  # a unit's preprocessor sliders
BLANK_MASK = (5, 250)  # a mask whose first channel is all <= 5 or all >= 250 is no mask (the extension's test)


class UnitArgs(BaseModel):
    """The extension's unit fields sdtorch reads (its names, types, bounds and defaults); other keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = False
    module: str = "none"
    model: str | None = "None"
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: Any = None
    mask: str | None = None
    resize_mode: int | str = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    pixel_perfect: bool = False
    control_mode: int | str = "Balanced"
    save_detected_map: bool = True
    hr_option: int | str = "Both"
    low_vram: bool = False  # accepted; no effect in sdtorch
    # the extension's options sdtorch does not implement: refused unless left at their defaults
    input_mode: str = "simple"
    advanced_weighting: list[float] | None = None
    effective_region_mask: str | None = None
    ipadapter_input: Any = None
    animatediff_batch: bool = False


@dataclass(frozen=True)
class DetectedMap:
    """A unit whose detected map follows the images: request.controlnet[index] or request.ip_adapter[index]
    (`kind`); `rgba`: an IP-Adapter unit's own image, which the extension shows as RGBA (its empty CLIP mask)."""

    kind: str  # "controlnet" | "ip_adapter"
    index: int
    rgba: bool = False


@dataclass(frozen=True)
class PlannedUnits:
    """A payload's enabled units as sdtorch runs them (ControlNet and IP-Adapter units), the detected maps that
    follow the images (the units with save_detected_map, in the payload's order), and what was changed."""

    units: list[ControlNetUnit] = field(default_factory=list)
    ip_adapter: list[IPAdapterUnit] = field(default_factory=list)
    detected_maps: list[DetectedMap] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def controlnet_units(scripts: dict[str, Any], models: ControlNetModels, request: GenerationRequest,
                     limits: Limits, clip_vision: ClipVisionFiles | None = None) -> PlannedUnits:
    """The ControlNet and IP-Adapter units of a payload's `alwayson_scripts`, checked (InvalidInputError naming the
    arg and field), with their models found in `models`, IP-Adapters' CLIP vision towers in `clip_vision`, and their
    images decoded. `request`: the payload's generation settings (img2img's init image, mask and resize mode stand
    in for a unit without image; the hires fix)."""
    args = _script_args(scripts)
    planned = PlannedUnits()
    for i, value in enumerate(args):
        where = f"alwayson_scripts.{SCRIPT}.args[{i}]"
        if value is None:
            continue
        unit = _parse(value, where)
        try:
            ip_module = find_ip_module(unit.module)
        except InvalidInputError as e:  # one of the extension's IP-Adapter modules that sdtorch does not run
            if not unit.enabled:
                continue
            raise InvalidInputError(f"{where}.module: {e}") from None
        preprocessor = ip_module.preprocessor if ip_module is not None else _preprocessor(unit.module, where)
        if not unit.enabled:
            continue
        if i >= UNIT_COUNT:
            raise InvalidInputError(f"{where}: the ControlNet extension takes {UNIT_COUNT} units "
                                    "(/controlnet/settings control_net_unit_count); A1111 would ignore this one")
        if ip_module is not None:
            prompt, own_image, warnings = _ip_unit(unit, ip_module, where, models,
                                                   clip_vision or ClipVisionFiles(None), request)
            prompt.validate(limits, where)
            if unit.save_detected_map:
                planned.detected_maps.append(DetectedMap("ip_adapter", len(planned.ip_adapter), own_image))
            planned.ip_adapter.append(prompt)
        else:
            built, warnings = _unit(unit, preprocessor, where, models, request)
            built.validate(limits, where)
            if unit.save_detected_map:
                planned.detected_maps.append(DetectedMap("controlnet", len(planned.units)))
            planned.units.append(built)
        planned.warnings.extend(warnings)
    return planned


def _script_args(scripts: dict[str, Any]) -> list[Any]:
    """The ControlNet script's args ([] when the payload has none)."""
    script = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == SCRIPT), None)
    if script is None:
        return []
    if not isinstance(script, dict):
        raise InvalidInputError(f'alwayson_scripts.{SCRIPT} must be an object {{"args": [unit, ...]}}, '
                                f"not {type(script).__name__}")
    args = script.get("args", [])
    if not isinstance(args, list):
        raise InvalidInputError(f"alwayson_scripts.{SCRIPT}.args must be a list of units, not {type(args).__name__}")
    return args


def _parse(value: Any, where: str) -> UnitArgs:
    """One arg as the extension's pydantic model reads it, its legacy keys renamed."""
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a ControlNet unit (a JSON object), not {type(value).__name__}")
    values = dict(value)
    for old, new in _LEGACY_KEYS.items():
        if old in values:
            if new in values:
                raise InvalidInputError(f"{where}: both {old!r} and {new!r} given (the same field; send {new!r})")
            values[new] = values.pop(old)
    try:
        return UnitArgs.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise InvalidInputError(problems) from None


def _preprocessor(module: str, where: str) -> Preprocessor:
    try:
        return get_preprocessor(module)
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}.module: {e}; /controlnet/module_list lists them") from None


def _model(args: UnitArgs, where: str, models: ControlNetModels) -> ControlNetModel:
    try:
        return models.find(args.model or "None")
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}.model: {e}") from None


def _unit(args: UnitArgs, p: Preprocessor, where: str, models: ControlNetModels,
          request: GenerationRequest) -> tuple[ControlNetUnit, list[str]]:
    """An enabled unit as a ControlNetUnit (model path from the listing, images as bytes or PIL images)."""
    _refuse_unsupported(args, p, where, hires=request.hires is not None)
    model = _model(args, where, models)
    if models.is_ip_adapter(model):
        raise InvalidInputError(f"{where}.model {model.title!r} is an IP-Adapter, which module {args.module!r} does "
                                "not take: use an IP-Adapter module (ip-adapter-auto, ip-adapter_clip_h, "
                                "ip-adapter_clip_g, ip-adapter_clip_sdxl_plus_vith)")
    resize_mode = _choice(args.resize_mode, RESIZE_TITLES, f"{where}.resize_mode", _RESIZE_ALIASES, latent=True)
    control_mode = _choice(args.control_mode, CONTROL_MODES, f"{where}.control_mode")
    image, mask, resize_mode = _images(args, p, where, request, resize_mode)
    sliders, warnings = _sliders(args, p, where)
    unit = ControlNetUnit(image=image, model=str(model.path), module=args.module, weight=args.weight,
                          guidance_start=args.guidance_start, guidance_end=args.guidance_end, control_mode=control_mode,
                          resize_mode=resize_mode, pixel_perfect=args.pixel_perfect, mask=mask, **sliders)
    return unit, warnings


def _ip_unit(args: UnitArgs, module: IPAdapterModule, where: str, models: ControlNetModels,
             clip_vision: ClipVisionFiles, request: GenerationRequest) -> tuple[IPAdapterUnit, bool, list[str]]:
    """An enabled IP-Adapter unit as an IPAdapterUnit (model path from the listing, the module's CLIP vision tower
    from the server's folder, the image as bytes), whether its image is the unit's own (not img2img's), and the
    warnings of its sliders (checked as the extension checks them; they do nothing)."""
    p = module.preprocessor
    _refuse_unsupported(args, p, where, hires=request.hires is not None)
    if args.guidance_start != 0.0 or args.guidance_end != 1.0:
        raise InvalidInputError(f"{where}: guidance_start {args.guidance_start} / guidance_end {args.guidance_end}: "
                                "sdtorch's IP-Adapter units act on every step; leave them at 0 and 1")
    model = _model(args, where, models)
    if models.is_ip_adapter(model) is False:
        raise InvalidInputError(f"{where}.model {model.title!r} is not an IP-Adapter (no image_proj and ip_adapter "
                                f"tensors): module {args.module!r} takes an IP-Adapter model (ip-adapter_sd15, "
                                "ip-adapter-plus_sdxl_vit-h...); use a ControlNet module with this model")
    wanted_by = f"{where}.module {args.module!r}"
    if module.name == AUTO:
        try:
            module = auto_module(model.name)
        except InvalidInputError as e:
            raise InvalidInputError(f"{where}.module: {e}") from None
        wanted_by += f" ({module.label} for {model.name})"
    assert module.clip_vision is not None
    encoder = clip_vision.find(module.clip_vision, wanted_by)
    _choice(args.resize_mode, RESIZE_TITLES, f"{where}.resize_mode", _RESIZE_ALIASES, latent=True)  # checked only
    _choice(args.control_mode, CONTROL_MODES, f"{where}.control_mode")
    image, own = _ip_image(args, where, request)
    _, warnings = _sliders(args, p, where)
    unit = IPAdapterUnit(image=image, model=str(model.path), image_encoder=str(encoder), weight=args.weight)
    return unit, own, warnings


def _ip_image(args: UnitArgs, where: str, request: GenerationRequest) -> tuple[bytes, bool]:
    """An IP-Adapter unit's image and whether it is its own: without one, img2img's image. Its mask is the extension's
    CLIP mask, which sdtorch does not apply: only an empty (all-zero) mask is taken."""
    text, mask_text = _unit_image_fields(args, where, request)
    if text is None:
        return request.init_image, False
    image = image_bytes(text, f"{where}.image")
    if mask_text is not None:
        if _mask_alpha(image, image_bytes(mask_text, f"{where}.mask"), where).any():
            raise InvalidInputError(f"{where}.mask: the extension's CLIP mask (blanking the image where it is white) "
                                    "is not supported by sdtorch's IP-Adapter units; send the image alone, or blank "
                                    "the masked part of the image yourself")
    return image, True


def _refuse_unsupported(args: UnitArgs, p: Preprocessor, where: str, hires: bool) -> None:
    if p.needs_weights:
        raise InvalidInputError(f"{where}.module {args.module!r}: this preprocessor runs a network sdtorch does not "
                                "run yet; preprocess the image elsewhere and send the map with module 'none'")
    unsupported = {"advanced_weighting": args.advanced_weighting is not None,
                   "effective_region_mask": args.effective_region_mask is not None,
                   "ipadapter_input": args.ipadapter_input is not None, "animatediff_batch": args.animatediff_batch,
                   "input_mode": args.input_mode.lower() != "simple"}
    for name, given in unsupported.items():
        if given:
            raise InvalidInputError(f"{where}.{name} is not supported by sdtorch (leave it out)")
    option = _choice(args.hr_option, HR_OPTIONS, f"{where}.hr_option")
    if hires and option != "Both":
        raise InvalidInputError(f"{where}.hr_option {option!r}: sdtorch's ControlNets and IP-Adapters act on both "
                                "passes of the hires fix; use 'Both'")


def _choice(value: int | str, names: tuple[str, ...], where: str, aliases: dict[str, str] | None = None,
            latent: bool = False) -> str:
    """One of the extension's enums, by index or by value (any case), as its canonical value."""
    if isinstance(value, int) and not isinstance(value, bool):
        if latent and value == 3:  # A1111's "Just resize (latent upscale)": the extension resizes plainly
            return names[0]
        if 0 <= value < len(names):
            return names[value]
    elif isinstance(value, str):
        text = value.strip().lower()
        text = (aliases or {}).get(text, text).lower()
        found = next((name for name in names if name.lower() == text), None)
        if found is not None:
            return found
    valid = ", ".join(f"{i} {name!r}" for i, name in enumerate(names))
    raise InvalidInputError(f"{where} {value!r} is not one of {valid}")


def _images(args: UnitArgs, p: Preprocessor, where: str, request: GenerationRequest,
            resize_mode: str) -> tuple[bytes | Image.Image, bytes | Image.Image | None, str]:
    """(control image, mask, resize mode) of a unit, as the extension picks them."""
    text, mask_text = _unit_image_fields(args, where, request)
    if text is None:
        # img2img's image, resize mode and (for inpaint modules, through the request) mask; none: an empty mask
        mask = _empty_mask(load_image(request.init_image)) if p.requires_mask and request.mask is None else None
        return request.init_image, mask, RESIZE_TITLES[RESIZE_MODES.index(request.resize_mode.lower())]
    image = image_bytes(text, f"{where}.image")
    mask = None if mask_text is None else image_bytes(mask_text, f"{where}.mask")
    if mask is None:
        return image, (_empty_mask(load_image(image)) if p.requires_mask else None), resize_mode
    alpha = _mask_alpha(image, mask, where)
    if p.requires_mask:
        return image, mask, resize_mode
    if (alpha <= BLANK_MASK[0]).all() or (alpha >= BLANK_MASK[1]).all():
        return image, None, resize_mode
    return Image.fromarray(alpha).convert("RGB"), None, resize_mode  # the extension's canvas scribble


def _unit_image_fields(args: UnitArgs, where: str, request: GenerationRequest) -> tuple[str | None, str | None]:
    """A unit's (image, mask) base64 texts; (None, None) where img2img's image stands in for a missing one."""
    text, mask_text = _image_fields(args.image, args.mask, where)
    if text is None:
        if mask_text is not None:
            raise InvalidInputError(f"{where}: a mask without an image; give image")
        if request.init_image is None:
            raise InvalidInputError(f"{where}: controlnet is enabled but no input image is given (image: base64)")
    return text, mask_text


def _mask_alpha(image: bytes, mask: bytes, where: str) -> np.ndarray:
    """A unit's mask as (H, W) uint8, its first channel; InvalidInputError unless it is the image's size."""
    picture, alpha = load_image(image), np.asarray(load_image(mask))[:, :, 0]
    if alpha.shape != (picture.height, picture.width):
        raise InvalidInputError(f"{where}: the mask is {alpha.shape[1]}x{alpha.shape[0]}, the image "
                                f"{picture.width}x{picture.height}: they must be the same size")
    return alpha


def _image_fields(image: Any, mask: str | None, where: str) -> tuple[str | None, str | None]:
    """(image, mask) base64 texts from the extension's forms: str (with `mask`), {"image", "mask"}, [image, mask]
    or [{"image", "mask"}]."""
    if isinstance(image, list) and len(image) == 1 and isinstance(image[0], dict):
        image = image[0]
    if isinstance(image, dict):
        unknown = set(image) - {"image", "mask"}
        if unknown:
            raise InvalidInputError(f"{where}.image: unknown key(s) {sorted(unknown)}; use {{'image', 'mask'}}")
        image, mask = image.get("image"), image.get("mask")
    elif isinstance(image, list):
        if len(image) != 2 or isinstance(image[0], dict):
            raise InvalidInputError(f"{where}.image: one image a unit ([image, mask] at most); sdtorch's IP-Adapter "
                                    "units do not take the extension's several images either (send one unit each)")
        image, mask = image
    for name, value in (("image", image), ("mask", mask)):
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f"{where}.{name} must be a base64 image, not {type(value).__name__}")
    return image or None, mask or None  # "" counts as none, as the extension's older API read it


def _empty_mask(image: Image.Image) -> Image.Image:
    """The extension's mask when an inpaint module gets none: zeros (nothing to inpaint)."""
    return Image.new("L", image.size, 0)


def _sliders(args: UnitArgs, p: Preprocessor, where: str) -> tuple[dict[str, Any], list[str]]:
    """processor_res, threshold_a, threshold_b of a unit (see `reset_out_of_range`), with a warning for each reset."""
    given = {name: getattr(args, name) for name in SLIDER_FIELDS}
    values, reset = reset_out_of_range(p, given)
    warnings = [f"{where}.{name} {given[name]} is outside {p.label}'s range: its default used" for name in reset]
    for message in warnings:
        log.info(message)
    return values, warnings


def reset_out_of_range(p: Preprocessor, values: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """`values` (SLIDER_FIELDS) with each outside its slider's range replaced by -1 (the default), as the extension's
    unit validator does; a slider the module lacks keeps its value (unused). Also the names of those replaced."""
    out, reset = dict(values), []
    for name, slider in zip(SLIDER_FIELDS, (p.resolution, p.slider_1, p.slider_2)):
        value = values[name]
        if slider is not None and value != -1 and not slider.minimum <= value <= slider.maximum:
            out[name] = -1
            reset.append(name)
    return out, reset


# ---- the response's extra images ----------------------------------------------------------------------------


def detected_maps(request: GenerationRequest, sources: list[DetectedMap]) -> list[Image.Image]:
    """The extension's detected maps of a job (its first iteration's `request`, as run), for the units of `sources`
    in order: a ControlNet unit's control map at the output size, preceded by the one at the hires size with the
    hires fix, inpaint maps shown with the mask half-transparent (the extension's visualize_inpaint_mask); an
    IP-Adapter unit's image as it is, once (the extension's display image of modules that return no image)."""
    width, height = request.width, request.height
    sizes = [(width, height)] if request.hires is None else [request.hires.target_size(width, height), (width, height)]
    maps = []
    for source in sources:
        if source.kind == "ip_adapter":
            image = load_image(request.ip_adapter[source.index].image)
            maps.append(image.convert("RGBA") if source.rgba else image)  # alpha 255 - empty mask / 2
            continue
        unit = request.controlnet[source.index]
        mask = unit.mask if unit.mask is not None else request.mask
        hint = control_map(unit, load_image(unit.image), None if mask is None else load_image(mask), width, height,
                           request.seed)  # as generation.py makes it
        maps += [visible_map(resize_image(hint, w, h, unit.resize_mode.lower())) for w, h in sizes]
    return maps


def visible_map(hint: Image.Image) -> Image.Image:
    """An inpaint map (RGBA, the mask in alpha) with alpha 255 - mask / 2; other maps unchanged."""
    if hint.mode != "RGBA":
        return hint
    pixels = np.array(hint)
    pixels[:, :, 3] = 255 - pixels[:, :, 3] // 2
    return Image.fromarray(pixels, "RGBA")
