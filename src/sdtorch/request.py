"""The generation request: every setting of one generation, with its name, default and rules, in one place.

    GenerationRequest(prompt="a red fox", steps=20, cfg_scale=None, ...)   # A1111 field names
        .hires: HiresFix | None        (A1111's enable_hr + hr_* fields)
        .inpaint: Inpainting           (mask_blur, inpainting_mask_invert, inpaint_full_res, ...)
        .controlnet: list[ControlNetUnit]  (the A1111 ControlNet extension's units: image, model, weight, ...)

Every door builds this one object: `pipe(**kw)` through `GenerationRequest.from_kwargs` (diffusers'
names such as `num_inference_steps` are aliases), the CLI (its flags are made from the field table
below), the infotext (its keys are in the same table) and, later, the HTTP server. `None` means "the
model's own default" (the built-in model's CFG 4 and 64 px; 7.5 and the native size otherwise).
`validate()` checks types, ranges and `Limits` before any work starts; it needs no model.
A refiner (`refiner_checkpoint`) takes over the sampling at `refiner_switch_at` (generation.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import random
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from PIL import Image

from .errors import InvalidInputError

ImageInput = Union[str, os.PathLike, bytes, Image.Image]
MAX_SEED = 2**32 - 1
INSTRUCT_PIX2PIX_IMAGE_CFG = 1.5  # an instruct-pix2pix model's image guidance when unset (diffusers', A1111's UI)
# A1111's upscalers without a model: the latent modes (F.interpolate's) and the pixel ones (upscaling.py)
LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                    "Latent (nearest)", "Latent (nearest-exact)")
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
HIRES_UPSCALERS = LATENT_UPSCALERS + PIXEL_UPSCALERS
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")  # A1111's 0, 1, 2
SCHEDULES = ("Automatic", "Karras", "Exponential", "Uniform", "SGM Uniform")


def random_seed(images: int = 1) -> int:
    """A seed for a request that asked for a random one (-1), such that image i's seed + i stays <= MAX_SEED."""
    return random.randrange(MAX_SEED - images)


@dataclass(frozen=True)
class Limits:
    """Upper bounds a request is checked against before any work (defaults fit a 24 GB CPU machine).

    Replace them per pipeline (`pipe.limits = Limits(max_steps=300)`) or per CLI call (`--limit max_steps=300`).
    """

    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 4_194_304  # width x height x images (16 at 512 px, one at 2048 px), first pass and hires target
    max_steps: int = 150  # per pass (A1111's slider maximum)
    max_batch: int = 64  # images per request
    max_hr_scale: float = 4.0
    max_mask_blur: int = 64
    max_upscaled_side: int = 8192  # the wider side of an Extras upscale's output (ExtrasUpscale)

    @classmethod
    def from_strings(cls, items: list[str]) -> Limits:
        """Limits from "key=value" strings (the CLI's `--limit`); unknown keys and bad numbers are errors."""
        values: dict[str, Any] = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise InvalidInputError(f"--limit {item!r}: use KEY=VALUE with KEY one of {', '.join(names)}"
                                        + suggestion(key, names))
            kind = float if names[key].type in (float, "float") else int
            try:
                values[key] = kind(raw)
            except ValueError:
                raise InvalidInputError(f"--limit {key}: {raw!r} is not a valid {kind.__name__}") from None
            if not values[key] > 0:
                raise InvalidInputError(f"--limit {key} must be positive, not {raw}")
        return cls(**values)


_RAISE = "raise it with Limits({0}=...) or --limit {0}=N"


# ---- the field table ---------------------------------------------------------------------------------


Check = Callable[[Any, Limits], "str | None"]  # an error message, or None when the value is fine


def setting(default: Any = None, help: str = "", *, cli: str | None = None, key: str | None = None,
            always: bool = False, aliases: tuple[str, ...] = (), checks: tuple[Check, ...] = (),
            choices: tuple[str, ...] = ()) -> Any:
    """A request field with its metadata: `cli` flag, infotext `key` (written when the value is not the
    default, or `always`), keyword `aliases` (diffusers' names), `checks` run by validate(), and `choices`."""
    metadata = dict(help=help, cli=cli, key=key, always=always, aliases=aliases, checks=checks, choices=choices)
    return field(default=default, metadata=metadata)


def at_least(low: float) -> Check:
    return lambda v, _: None if v >= low else f"must be >= {low}"


def above(low: float) -> Check:
    return lambda v, _: None if v > low else f"must be > {low}"


def below(high: float) -> Check:
    return lambda v, _: None if v < high else f"must be < {high}"


def at_most(limit: str) -> Check:
    """`value <= limits.<limit>`; the message names the limit so a user can raise it."""
    return lambda v, limits: (None if v <= getattr(limits, limit)
                              else f"is over the limit {limit}={getattr(limits, limit)} ({_RAISE.format(limit)})")


def at_most_one(v: float, _: Limits) -> str | None:
    return None if v <= 1 else "must be <= 1"


def finite(v: float, _: Limits) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def multiple_of_8(v: int, _: Limits) -> str | None:
    return None if v % 8 == 0 else f"must be a multiple of 8 (nearest below: {v // 8 * 8})"


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda v, _: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def _seed_range(v: int, _: Limits) -> str | None:
    return None if v == -1 or 0 <= v <= MAX_SEED else f"must be -1 (random) or in [0, {MAX_SEED}]"


def _known_sampler(v: str, _: Limits) -> str | None:
    from .sampling.samplers import resolve, sampler_names

    try:
        resolve(v)
    except InvalidInputError:
        return f"is not a sampler{suggestion(v, sampler_names())} Valid names: {', '.join(sampler_names())}"
    return None


def _known_schedule(v: str, _: Limits) -> str | None:
    from .sampling.samplers import resolve

    try:
        resolve("Euler", v)
    except InvalidInputError:
        return f"is not a schedule{suggestion(v, SCHEDULES)} Valid names: {', '.join(SCHEDULES)}"
    return None


@dataclass
class HiresFix:
    """A1111's hires fix: a second pass at a larger size (`enable_hr` turns it on)."""

    hr_scale: float = setting(2.0, "upscale factor of the second pass", cli="--hires-scale", key="Hires upscale", always=True,
                              checks=(finite, at_least(1.0), at_most("max_hr_scale")))
    hr_second_pass_steps: int = setting(0, "second-pass steps (0: the same as steps)", cli="--hires-steps",
                                        key="Hires steps", checks=(at_least(0), at_most("max_steps")))
    hr_upscaler: str = setting("Latent", "how the first pass is enlarged", cli="--hires-upscaler", key="Hires upscaler",
                               always=True, checks=(one_of(HIRES_UPSCALERS),), choices=HIRES_UPSCALERS)
    # the target size: infotext "Hires resize: WxH" (written with the size, see infotext.py)
    hr_resize_x: int = setting(0, "second-pass width instead of the scale (0: from the height and the aspect ratio, "
                               "or width x scale)", cli="--hires-width",
                               checks=(at_least(0), multiple_of_8, at_most("max_width")))
    hr_resize_y: int = setting(0, "second-pass height instead of the scale (0: from the width and the aspect ratio, "
                               "or height x scale)", cli="--hires-height",
                               checks=(at_least(0), multiple_of_8, at_most("max_height")))
    hr_denoising_strength: float = setting(0.7, "second-pass denoising strength", cli="--hires-denoise",
                                           key="Denoising strength", always=True, checks=(finite, above(0.0), at_most_one))
    hr_sampler_name: str | None = setting(None, "the second pass's sampler (None: the first pass's)",
                                          cli="--hires-sampler", key="Hires sampler", checks=(_known_sampler,))
    hr_scheduler: str | None = setting(None, "the second pass's schedule (None: the first pass's setting)",
                                       cli="--hires-schedule", key="Hires schedule type", checks=(_known_schedule,))
    hr_prompt: str = setting("", "the second pass's prompt ('': the first pass's)", cli="--hires-prompt",
                             key="Hires prompt")
    hr_negative_prompt: str = setting("", "the second pass's negative prompt ('': the first pass's)",
                                      cli="--hires-negative", key="Hires negative prompt")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the second pass for a first pass of width x height."""
        x, y = self.hr_resize_x, self.hr_resize_y
        if not x and not y:
            return int(width * self.hr_scale) // 8 * 8, int(height * self.hr_scale) // 8 * 8
        return x or y * width // height // 8 * 8, y or x * height // width // 8 * 8  # A1111: keep the aspect


@dataclass
class Inpainting:
    """How a mask is used (A1111's img2img inpainting settings)."""

    mask_blur: int = setting(4, "mask blur in pixels", cli="--mask-blur", key="Mask blur", always=True,
                             checks=(at_least(0), at_most("max_mask_blur")))
    inpainting_mask_invert: bool = setting(False, "repaint the black part of the mask instead", cli="--mask-invert",
                                           key="Mask mode")
    inpaint_full_res: bool = setting(False, "generate only the masked region, at the full size", cli="--only-masked",
                                     key="Inpaint area")
    inpaint_full_res_padding: int = setting(0, "pixels around the masked region (with --only-masked)",
                                            cli="--only-masked-padding", key="Masked area padding", always=True,
                                            checks=(at_least(0), at_most("max_width")))
    mask_overlay: bool = setting(True, "paste the result onto the original through the mask")


CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")  # the A1111 extension's


def _resize_mode_name(v: str, _: Limits) -> str | None:
    return None if v.lower() in RESIZE_MODES else f"must be one of {', '.join(map(repr, RESIZE_MODES))}"


@dataclass
class ControlNetUnit:
    """One ControlNet guiding the generation (a unit of A1111's ControlNet extension, its names and API defaults):
    the control image, run through the preprocessor `module` (preprocessors.py: "canny", "none" for an image
    already preprocessed...), resized to the output size by `resize_mode`; the ControlNet `model` (a file or
    diffusers folder, loaded by the model: `Pipeline.load_controlnet`); its residuals scaled by `weight` and added
    to the UNet's calls from `guidance_start` to `guidance_end` (fractions of the sampling steps). Several units
    sum their residuals (diffusers' MultiControlNetModel)."""

    image: ImageInput | None = setting(None, "the control image (CLI: starts a unit; the --control-* and "
                                       "preprocessor flags after it set that unit's fields)", cli="--control")
    model: str | os.PathLike | None = setting(None, "the ControlNet: a file (original or diffusers layout) or a "
                                              "diffusers folder", cli="--control-model")
    module: str = setting("none", 'the preprocessor run on the image first: "canny", "invert", "tile_resample"... '
                          "('none': the image is the control map)", cli="--preprocessor")
    weight: float = setting(1.0, "scale of the ControlNet's residuals (diffusers' controlnet_conditioning_scale)",
                            cli="--control-weight", checks=(finite, at_least(0.0)))
    guidance_start: float = setting(0.0, "the fraction of the steps from which the ControlNet guides",
                                    cli="--control-start", checks=(finite, at_least(0.0), at_most_one))
    guidance_end: float = setting(1.0, "the fraction of the steps up to which the ControlNet guides",
                                  cli="--control-end", checks=(finite, at_least(0.0), at_most_one))
    control_mode: str = setting("Balanced", "how prompt and ControlNet are balanced: 'Balanced'; 'My prompt is more "
                                "important' (residuals of shallower layers weaker); 'ControlNet is more important' "
                                "(also only on CFG's conditional half)", cli="--control-mode",
                                checks=(one_of(CONTROL_MODES),), choices=CONTROL_MODES)
    guess_mode: bool = setting(False, "diffusers' guess mode: residuals scaled from 0.1 (shallowest) to 1 (mid "
                               "block) and only on CFG's conditional half; with control_mode 'Balanced'",
                               cli="--control-guess-mode")
    resize_mode: str = setting("crop and resize", "how the control image meets the output size (A1111's "
                               "'Just Resize', 'Crop and Resize', 'Resize and Fill', any case)",
                               cli="--control-resize", checks=(_resize_mode_name,))
    processor_res: int = setting(-1, "the preprocessor's working resolution (-1: its default, 512)",
                                 cli="--preprocessor-res")
    threshold_a: float = setting(-1.0, "the preprocessor's first parameter (canny: low threshold; -1: its default)",
                                 cli="--threshold-a", checks=(finite,))
    threshold_b: float = setting(-1.0, "the preprocessor's second parameter (canny: high threshold; -1: its "
                                 "default)", cli="--threshold-b", checks=(finite,))
    pixel_perfect: bool = setting(False, "the preprocessor's resolution from the output size (the extension's "
                                  "Pixel Perfect)", cli="--pixel-perfect")
    mask: ImageInput | None = setting(None, "the inpaint preprocessors' mask, white = repaint (None: the request's "
                                      "inpainting mask)", cli="--control-mask")

    def validate(self, limits: Limits, where: str) -> None:
        _check_fields(self, limits, f"{where}.")
        if self.image is None:
            raise InvalidInputError(f"{where}.image is missing: give the control image")
        if self.model is None:
            raise InvalidInputError(f"{where}.model is missing: give the ControlNet's file or folder")
        if self.guidance_start >= self.guidance_end:
            raise InvalidInputError(f"{where}.guidance_start {self.guidance_start} must be below guidance_end "
                                    f"{self.guidance_end}")
        if self.guess_mode and self.control_mode != "Balanced":
            raise InvalidInputError(f"{where}: guess_mode is diffusers' own weighting; it does not combine with "
                                    f"control_mode {self.control_mode!r}")


@dataclass(frozen=True)
class ModelDefaults:
    """What a request's `None` settings become for one model (`Pipeline.defaults`); saved with the model when they
    differ from these (checkpoints/saving.py)."""

    steps: int = 20
    sampler_name: str = "DPM++ 2M"
    scheduler: str | None = None  # None: the sampler's own
    cfg_scale: float = 7.5  # A1111's and diffusers' habit

    def validate(self, where: str) -> ModelDefaults:
        """Check the values by GenerationRequest's rules for the same fields; raise InvalidInputError naming `where`."""
        try:
            GenerationRequest(**dataclasses.asdict(self)).validate()
        except InvalidInputError as error:
            raise InvalidInputError(f"{where}: the model's default {error}") from None
        return self

    @classmethod
    def from_dict(cls, values: object, where: str) -> ModelDefaults:
        """Defaults from a JSON object of the fields that differ; unknown keys are errors."""
        return from_fields(cls, values, where, "model default").validate(where)

    def changes(self) -> dict[str, Any]:
        """The fields that differ from the plain defaults (what a saved model records)."""
        plain = ModelDefaults()
        return {k: v for k, v in dataclasses.asdict(self).items() if getattr(plain, k) != v}


# Models distilled for a few steps (SDXL Turbo, Lightning, Hyper-SD): trailing timesteps and no guidance
FEW_STEP_DEFAULTS = ModelDefaults(steps=4, sampler_name="Euler a", scheduler="SGM Uniform", cfg_scale=1.0)


@dataclass
class IPAdapterUnit:
    """An image as a prompt (IP-Adapter, Ye et al. 2023): `image` encoded by a CLIP vision tower (`image_encoder`),
    turned into tokens by the adapter `model`, which the UNet's cross-attentions read beside the text through the
    adapter's own keys and values, scaled by `weight` (diffusers' `ip_adapter_image` and `set_ip_adapter_scale`)."""

    image: ImageInput | None = setting(None, "the image prompt", cli="--ip-image")
    model: str | os.PathLike | None = setting(None, "the IP-Adapter file (ip-adapter_sd15, ip-adapter-plus_sdxl_vit-h..."
                                              "; CLI: starts a unit, the --ip-* flags after it set its fields)",
                                              cli="--ip-adapter")
    image_encoder: str | os.PathLike | None = setting(None, "the CLIP vision tower it was trained with: a transformers "
                                                      "folder or file (None: the `image_encoder` folder beside the "
                                                      "adapter's, as h94/IP-Adapter lays them out)", cli="--ip-encoder")
    weight: float = setting(1.0, "scale of the image tokens' attention (diffusers' ip_adapter_scale)",
                            cli="--ip-weight", checks=(finite, at_least(0.0)))

    def validate(self, limits: Limits, where: str) -> None:
        _check_fields(self, limits, f"{where}.")
        if self.image is None:
            raise InvalidInputError(f"{where}.image is missing: give the image prompt")
        if self.model is None:
            raise InvalidInputError(f"{where}.model is missing: give the IP-Adapter file")


def _no_face_restoration(v: float, _: Limits) -> str | None:
    return None if v == 0 else "must be 0: sdtorch has no face restoration models (GFPGAN, CodeFormer)"


def up_to(high: float) -> Check:
    return lambda v, _: None if v <= high else f"must be <= {high}"


EXTRAS_RESIZE_MODES = (0, 1)  # A1111's Extras: 0 scale by upscaling_resize, 1 scale to upscaling_resize_w x _h


@dataclass
class ExtrasUpscale:
    """A1111's Extras upscale of a finished image (/sdapi/v1/extra-single-image; upscaling.py runs it): by
    `upscaling_resize` or to `upscaling_resize_w` x `upscaling_resize_h` with upscaler 1, blended with upscaler 2's
    result at `extras_upscaler_2_visibility`. Upscaler 1 "None" leaves the image as it is. A1111's names and API
    defaults; its face restoration is not there (its visibilities must stay 0)."""

    resize_mode: int = setting(0, "0: scale by upscaling_resize; 1: scale to upscaling_resize_w x upscaling_resize_h",
                               checks=(one_of(EXTRAS_RESIZE_MODES),))
    upscaling_resize: float = setting(2.0, "the scale factor (resize_mode 0)",
                                      checks=(finite, at_least(1.0), up_to(8.0)))
    upscaling_resize_w: int = setting(512, "the target width (resize_mode 1)",
                                      checks=(at_least(1), at_most("max_upscaled_side")))
    upscaling_resize_h: int = setting(512, "the target height (resize_mode 1)",
                                      checks=(at_least(1), at_most("max_upscaled_side")))
    upscaling_crop: bool = setting(True, "resize_mode 1: crop the result to the target size (the aspect ratio kept)")
    upscaler_1: str = setting("None", "the upscaler (/sdapi/v1/upscalers)", checks=(one_of(PIXEL_UPSCALERS),))
    upscaler_2: str = setting("None", "a second upscaler blended in", checks=(one_of(PIXEL_UPSCALERS),))
    extras_upscaler_2_visibility: float = setting(0.0, "upscaler 2's share of the blend",
                                                  checks=(finite, at_least(0.0), at_most_one))
    gfpgan_visibility: float = setting(0.0, "A1111's GFPGAN face restoration: not in sdtorch (0)",
                                       checks=(_no_face_restoration,))
    codeformer_visibility: float = setting(0.0, "A1111's CodeFormer face restoration: not in sdtorch (0)",
                                           checks=(_no_face_restoration,))

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the result for an image of width x height (A1111's: a scaled size floored to a
        multiple of 8; resize_mode 1 with crop: the target size)."""
        if self.upscaler_1 == "None":
            return width, height
        if self.resize_mode == 1 and self.upscaling_crop:
            return self.upscaling_resize_w, self.upscaling_resize_h
        return scaled_size(width, height, self.scale_for(width, height))

    def scale_for(self, width: int, height: int) -> float:
        """The factor an image of width x height is scaled by (resize_mode 1: enough to cover the target)."""
        if self.resize_mode == 1:
            return max(self.upscaling_resize_w / width, self.upscaling_resize_h / height)
        return self.upscaling_resize

    def validate(self, limits: Limits, width: int, height: int, where: str = "") -> ExtrasUpscale:
        """Check the fields, and that the result for a width x height image is at least 8 px and at most
        limits.max_upscaled_side a side; InvalidInputError naming the field otherwise."""
        _check_fields(self, limits, where)
        if self.upscaler_1 == "None":
            return self
        for w, h in (self.output_size(width, height), scaled_size(width, height, self.scale_for(width, height))):
            if min(w, h) < 8:
                raise InvalidInputError(f"{where}upscaling: a {width}x{height} image scaled by "
                                        f"{self.scale_for(width, height):g} is under 8 pixels a side")
            if max(w, h) > limits.max_upscaled_side:
                raise InvalidInputError(f"{where}upscaling: {width}x{height} becomes {w}x{h}, over the limit "
                                        f"max_upscaled_side={limits.max_upscaled_side} "
                                        f"({_RAISE.format('max_upscaled_side')})")
        return self


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's upscale target: each side times `scale`, floored to a multiple of 8."""
    return int(width * scale // 8 * 8), int(height * scale // 8 * 8)


UNIT_FIELDS: dict[str, type] = {"controlnet": ControlNetUnit, "ip_adapter": IPAdapterUnit}  # request fields of units


def from_fields(cls: type, value: Any, where: str, noun: str = "field") -> Any:
    """A `cls` (a dataclass) from itself or a dict (JSON object) of its fields; unknown keys are errors naming
    the closest field."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a {cls.__name__} or a JSON object of its fields, not {value!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in names:
            raise InvalidInputError(f"{where}: unknown {noun} {key!r}{suggestion(str(key), names)}")
    return cls(**value)


# Infotext values of the boolean inpainting keys, as A1111 writes them
BOOLEAN_LABELS = {
    "Mask mode": ("Inpaint masked", "Inpaint not masked"),
    "Inpaint area": ("Whole picture", "Only masked"),
    "Tiling": ("False", "True"),
}


@dataclass
class GenerationRequest:
    """One generation: txt2img, img2img (`init_image`) or inpainting (`init_image` + `mask`), optionally
    with the hires fix. Field names are A1111's API names; `None` means the model's default."""

    prompt: str | list[str] = setting("", "what to draw (A1111 syntax: (word:1.2), [word], BREAK)")
    negative_prompt: str | list[str] = setting("", "what not to draw", cli="--negative")
    steps: int | None = setting(None, "sampling steps (None: the model's, 20; 4 for few-step models)", cli="--steps", key="Steps", always=True, aliases=("num_inference_steps",),
                         checks=(at_least(1), at_most("max_steps")))
    sampler_name: str | None = setting(None, 'A1111 name, e.g. "DPM++ 2M", "Euler a", "DDIM", "UniPC" (None: the '
                                       "model's, DPM++ 2M; Euler a for few-step models)",
                                cli="--sampler", key="Sampler", always=True, aliases=("sampler",))
    scheduler: str | None = setting(None, "Automatic, Karras, Exponential, Uniform, SGM Uniform (None: the "
                                    "model's: the sampler's own; SGM Uniform for few-step models)", cli="--schedule", key="Schedule type", always=True, aliases=("schedule",),
                                    )
    cfg_scale: float | None = setting(None, "classifier-free guidance scale (None: the model's, 7.5; 4 for the "
                                      "built-in model; 1 for few-step models)", cli="--cfg", key="CFG scale", always=True, aliases=("guidance_scale",),
                                      checks=(finite, at_least(0.0)))
    seed: int = setting(-1, "-1: random; image i of a batch uses seed + i", cli="--seed", key="Seed", always=True,
                        checks=(_seed_range,))
    eta_noise_seed_delta: int = setting(0, "A1111's ENSD: after each image's initial noise, its sampler's noise "
                                        "comes from seed + this (0: the seed's own stream goes on)", cli="--ensd",
                                        key="ENSD", checks=(at_least(0),))
    subseed: int = setting(-1, "A1111's variation seed (image i uses subseed + i; -1: random)", cli="--subseed",
                           key="Variation seed", checks=(_seed_range,))
    subseed_strength: float = setting(0.0, "how far each image's initial noise turns toward its variation seed's "
                                      "(0: not at all, 1: all the way)", cli="--subseed-strength",
                                      key="Variation seed strength", checks=(finite, at_least(0.0), at_most_one))
    seed_resize_from_w: int = setting(-1, "A1111's seed resize: draw the initial noise as for this width and "
                                      "centre it (-1 or 0: off)", cli="--seed-resize-from-w",
                                      checks=(at_least(-1), at_most("max_width")))
    seed_resize_from_h: int = setting(-1, "the same for the height", cli="--seed-resize-from-h",
                                      checks=(at_least(-1), at_most("max_height")))
    width: int | None = setting(None, "multiple of 8 (None: the model's native size, or the init image's)",
                                cli="--width", checks=(at_least(8), multiple_of_8, at_most("max_width")))
    height: int | None = setting(None, "multiple of 8 (None: the model's native size, or the init image's)",
                                 cli="--height", checks=(at_least(8), multiple_of_8, at_most("max_height")))
    batch_size: int = setting(1, "images per prompt", cli="--batch", aliases=("num_images_per_prompt",),
                              checks=(at_least(1), at_most("max_batch")))
    clip_skip: int = setting(1, "A1111's Clip skip (1: the last layer)", cli="--clip-skip", key="Clip skip",
                             checks=(at_least(1),))
    eta: float | None = setting(None, "noise of DDIM and the ancestral samplers (None: the sampler's own)",
                                cli="--eta", key="Eta", checks=(finite, at_least(0.0)))
    image_cfg_scale: float | None = setting(None, "instruct-pix2pix models: how closely the edit keeps to the init "
                                            "image (None: 1.5, diffusers' and A1111's; other models ignore it)",
                                            cli="--image-cfg", key="Image CFG scale", always=True,
                                            aliases=("image_guidance_scale",), checks=(finite, at_least(0.0)))
    guidance_rescale: float = setting(0.0, "guidance rescale phi (Lin et al. 2023)", cli="--guidance-rescale",
                                      key="CFG Rescale phi",
                                      checks=(finite, at_least(0.0), at_most_one))
    init_image: ImageInput | None = setting(None, "img2img / inpainting source image", cli="--init-image",
                                            aliases=("image",))
    denoising_strength: float = setting(0.75, "img2img denoising strength in (0, 1]", cli="--strength",
                                        key="Denoising strength", always=True, aliases=("strength",),
                                        checks=(finite, above(0.0), at_most_one))
    mask: ImageInput | None = setting(None, "inpainting mask (white = repaint)", cli="--mask", aliases=("mask_image",))
    resize_mode: str = setting("just resize", "how the init image meets the size", cli="--resize-mode",
                               checks=(one_of(RESIZE_MODES),), choices=RESIZE_MODES)
    deep_cache: int = setting(1, "step caching (DeepCache): the whole UNet every N-th model call, only its "
                              "shallow layers between (1: off); about 2x faster at 3, and the picture changes",
                              cli="--deep-cache", key="Deep cache interval", checks=(at_least(1),))
    refiner_checkpoint: str | None = setting(None, "a second model that finishes the sampling (A1111's refiner, "
                                             "e.g. SDXL's): a checkpoint path (the server: a model name)",
                                             cli="--refiner", key="Refiner")
    refiner_switch_at: float = setting(0.8, "the fraction of the sampling, by noise level, after which the refiner "
                                       "runs", cli="--refiner-switch-at", key="Refiner switch at",
                                       checks=(finite, above(0.0), below(1.0)))
    tiled_decode: bool | None = setting(None, "decode the VAE in tiles (None: above 1024 px)")
    tiling: bool = setting(False, "seamless tiles: the UNet's and the VAE's convolutions wrap around the picture's "
                           "edges (A1111's Tiling)", cli="--tiling", key="Tiling")
    hires: HiresFix | None = setting(None, "the hires fix (None: off)")
    inpaint: Inpainting = field(default_factory=Inpainting, metadata=dict(help="inpainting settings"))
    controlnet: list[ControlNetUnit] = field(default_factory=list, metadata=dict(
        help="ControlNet units (ControlNetUnit or dicts of its fields), their residuals summed"))
    ip_adapter: list[IPAdapterUnit] = field(default_factory=list, metadata=dict(
        help="image prompts (IPAdapterUnit or dicts of its fields), their tokens read side by side"))

    # ---- building ---------------------------------------------------------------------------------

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationRequest:
        """A request from keyword arguments: this class's fields, the fields of its groups (A1111's flat names:
        `enable_hr=True, hr_scale=2, mask_blur=8`) and diffusers' aliases. An unknown name is an error that
        names the closest valid one."""
        top, hires, inpaint = {}, {}, {}
        names = keyword_names()
        enable_hr = kwargs.pop("enable_hr", None)
        for name, value in kwargs.items():
            target = names.get(name)
            if target is None:
                raise InvalidInputError(f"unknown argument {name!r}{suggestion(name, [*names, 'enable_hr'])}")
            group, field_name = target
            bucket = {"hires": hires, "inpaint": inpaint}.get(group, top)
            if field_name in bucket:
                raise InvalidInputError(f"{name!r} and another name for the same setting ({field_name!r}) were both given")
            bucket[field_name] = value
        if enable_hr is not None and not isinstance(enable_hr, bool):
            raise InvalidInputError(f"enable_hr must be True or False, not {enable_hr!r}")
        if hires and not enable_hr and "hires" not in top:
            raise InvalidInputError(f"{', '.join(hires)} set but the hires fix is off: pass enable_hr=True")
        if enable_hr and "hires" not in top:
            top["hires"] = HiresFix(**hires)
        if inpaint and "inpaint" not in top:
            top["inpaint"] = Inpainting(**inpaint)
        for name, unit_class in UNIT_FIELDS.items():
            if isinstance(top.get(name), (list, tuple)):
                top[name] = [from_fields(unit_class, u, f"{name}[{i}]") for i, u in enumerate(top[name])]
            elif isinstance(top.get(name), (unit_class, dict)):  # one unit
                top[name] = [from_fields(unit_class, top[name], name)]
        return cls(**top)

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    # ---- validation -------------------------------------------------------------------------------

    def validate(self, limits: Limits | None = None) -> GenerationRequest:
        """Check every field's type and rules, and the whole request against `limits`; return self.

        Raises InvalidInputError naming the field (and the limit, when one is exceeded). Cheap: no model,
        no image decoding.
        """
        limits = limits or Limits()
        _check_fields(self, limits, "")
        if self.hires is not None:
            _check_fields(self.hires, limits, "")
        _check_fields(self.inpaint, limits, "")
        for name, unit_class in UNIT_FIELDS.items():
            for i, unit in enumerate(getattr(self, name)):
                if not isinstance(unit, unit_class):
                    raise InvalidInputError(f"{name}[{i}] must be a {unit_class.__name__}, not {unit!r}")
                unit.validate(limits, f"{name}[{i}]")
        prompts = self.prompts()
        if not prompts:
            raise InvalidInputError("prompt must be a string or a non-empty list of strings")
        if isinstance(self.negative_prompt, list) and len(self.negative_prompt) != len(prompts):
            raise InvalidInputError(f"{len(self.negative_prompt)} negative prompts for {len(prompts)} prompts")
        images = self.image_count()
        if images > limits.max_batch:
            raise InvalidInputError(f"{images} images ({len(prompts)} prompts x batch {self.batch_size}) are over "
                                    f"the limit max_batch={limits.max_batch}")
        for name in ("seed", "subseed"):
            seed = getattr(self, name)
            if seed != -1 and seed + images - 1 > MAX_SEED:
                raise InvalidInputError(f"{name} {seed} + {images} images passes the largest seed {MAX_SEED}")
        if self.mask is not None and self.init_image is None:
            raise InvalidInputError("a mask needs an init image to inpaint (image / --init-image)")
        if self.tiling and self.tiled_decode:
            raise InvalidInputError("tiled_decode cannot wrap around the edges: with tiling the VAE decodes the whole "
                                    "latent (leave tiled_decode unset)")
        if self.init_image is not None and self.hires is not None:
            raise InvalidInputError("the hires fix is for txt2img; for a larger img2img, give the larger width and height")
        if self.steps is not None:  # else checked once the model's default is known
            self.check_steps(self.steps)
        if self.width is not None and self.height is not None:  # else known once the model or init image is
            self.check_size(self.width, self.height, limits)
            if self.hires is not None:
                self.check_size(*self.hires.target_size(self.width, self.height), limits)
        for name, check in (("sampler_name", _known_sampler), ("scheduler", _known_schedule)):  # last: they import torch
            value = getattr(self, name)
            problem = None if value is None else check(value, limits)
            if problem:
                raise InvalidInputError(f"{name} {value!r} {problem}")
        return self

    def check_steps(self, steps: int) -> None:
        """That img2img and the hires fix's second pass run at least one step with `steps` sampling steps."""
        if self.init_image is not None and int(steps * self.denoising_strength) < 1:
            raise InvalidInputError(f"denoising_strength {self.denoising_strength} with {steps} steps runs no "
                                    "step; raise either")
        if self.hires is not None:
            second = self.hires.hr_second_pass_steps or steps
            if int(second * self.hires.hr_denoising_strength) < 1:
                raise InvalidInputError(f"hr_denoising_strength {self.hires.hr_denoising_strength} with {second} "
                                        "second-pass steps runs no step; raise either")

    def check_size(self, width: int, height: int, limits: Limits) -> None:
        """The pixel budget for `images` pictures of width x height (the first pass and the hires target)."""
        pixels = width * height * self.image_count()
        if pixels > limits.max_pixels:
            raise InvalidInputError(f"{width}x{height} x {pixels // (width * height)} image(s) = {pixels:,} pixels is "
                                    f"over the limit max_pixels={limits.max_pixels:,} ({_RAISE.format('max_pixels')})")
        for value, name, limit in ((width, "width", "max_width"), (height, "height", "max_height")):
            if value > getattr(limits, limit):
                raise InvalidInputError(f"{name} {value} is over the limit {limit}={getattr(limits, limit)} "
                                        f"({_RAISE.format(limit)})")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def image_count(self) -> int:
        """How many images the request makes: batch_size per prompt."""
        return len(self.prompts()) * self.batch_size


# ---- the table, read generically -----------------------------------------------------------------------

GROUPS = {"hires": HiresFix, "inpaint": Inpainting}


def keyword_names() -> dict[str, tuple[str | None, str]]:
    """Every keyword `from_kwargs` takes -> (group or None, field name)."""
    names: dict[str, tuple[str | None, str]] = {}
    for f in dataclasses.fields(GenerationRequest):
        for name in (f.name, *f.metadata.get("aliases", ())):
            names[name] = (None, f.name)
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            names[f.name] = (group, f.name)
    return names


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type hint) of a request class, in declaration order."""
    hints = typing.get_type_hints(cls, globalns={**globals(), "ImageInput": ImageInput})
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def suggestion(name: str, valid: typing.Iterable[str]) -> str:
    """The closest valid name as "; did you mean 'x'?", or "." when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "."


def _allowed(hint: Any) -> tuple[type, ...]:
    """The runtime types a hint accepts (int where float is asked; lists as list)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed(arg))
    if origin is list:
        return (list, tuple)
    if hint is float:
        return (float, int)
    if hint is os.PathLike:
        return (os.PathLike, Path)
    return (type(None),) if hint is type(None) else (hint,)


def _item_types(hint: Any) -> tuple[type, ...]:
    """The element types a hint's list part allows (str for `str | list[str]`)."""
    if typing.get_origin(hint) is list:
        return typing.get_args(hint) or (object,)
    if typing.get_origin(hint) in (Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _item_types(arg))
    return ()


def _type_name(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None").replace("PIL.Image.Image", "PIL image").replace("os.PathLike", "path")


def _check_fields(obj: Any, limits: Limits, prefix: str) -> None:
    for f, hint in fields_of(type(obj)):
        value = getattr(obj, f.name)
        allowed = _allowed(hint)
        bad_bool = isinstance(value, bool) and bool not in allowed
        if bad_bool or not isinstance(value, allowed):
            raise InvalidInputError(f"{prefix}{f.name} must be {_type_name(hint)}, not {value!r} "
                                    f"({type(value).__name__})")
        items = _item_types(hint)
        if isinstance(value, (list, tuple)) and not all(isinstance(v, items) for v in value):
            kinds = " or ".join("strings" if t is str else f"{t.__name__}s" for t in items)
            raise InvalidInputError(f"{prefix}{f.name} must hold {kinds} only")
        if value is None or isinstance(value, (list, tuple, bool)):
            continue
        for check in f.metadata.get("checks", ()):
            problem = check(value, limits)
            if problem:
                raise InvalidInputError(f"{prefix}{f.name} {value!r} {problem}")
