"""Upscaling without an upscaler model, as AUTOMATIC1111 does it: the hires fix's latent modes and pixel upscalers,
and the Extras upscale of a finished image (`/sdapi/v1/extra-single-image`).

    upscale_latents(latents, 128, 128, "Latent (bicubic)")     # (B, C, 64, 64) -> (B, C, 128, 128)
    resize_with(image, 1024, 1024, "Lanczos")                  # the hires fix's pixel-space enlargement
    extras_upscale(image, ExtrasUpscale(upscaler_1="Lanczos")) # -> (2x image, {"Postprocess upscale by": 2, ...})

The names (request.LATENT_UPSCALERS, PIXEL_UPSCALERS) and the Extras settings (request.ExtrasUpscale) live in
request.py with the other settings.
"""

from __future__ import annotations

import PIL.Image
import torch.nn.functional as F
from torch import Tensor

from .images import LANCZOS
from .request import ExtrasUpscale, scaled_size

# A1111's latent upscale modes: name -> (F.interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# The pixel upscalers' own resampling; "None" does none (the final Lanczos resize does it all)
PIXEL_FILTERS: dict[str, PIL.Image.Resampling | None] = {
    "None": None, "Lanczos": LANCZOS, "Nearest": PIL.Image.Resampling.NEAREST,
}


def upscale_latents(latents: Tensor, height: int, width: int, upscaler: str) -> Tensor:
    """(B, C, h, w) latents -> (B, C, height, width) by one of LATENT_MODES."""
    mode, antialias = LATENT_MODES[upscaler]
    return F.interpolate(latents, size=(height, width), mode=mode, antialias=antialias)


def upscale_by(image: PIL.Image.Image, scale: float, upscaler: str) -> PIL.Image.Image:
    """A1111's `Upscaler.upscale` for a pixel upscaler: the target is each side times `scale` floored to a multiple of
    8; the upscaler's own resize (to int(side * scale)) runs unless the image already covers the target (at scale 1
    it runs anyway), then a Lanczos resize reaches the target where the sizes still differ."""
    target = scaled_size(image.width, image.height, scale)
    resample = PIXEL_FILTERS[upscaler]
    covers = image.width >= target[0] and image.height >= target[1]
    if resample is not None and (scale == 1 or not covers):
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    if image.size != target:
        image = image.resize(target, resample=LANCZOS)
    return image


def resize_with(image: PIL.Image.Image, width: int, height: int, upscaler: str) -> PIL.Image.Image:
    """To exactly width x height as A1111's `images.resize_image` (just resize) with an upscaler: enlarging goes
    through the upscaler (`upscale_by`), then a Lanczos resize to the size where it differs."""
    scale = max(width / image.width, height / image.height)
    if upscaler != "None" and image.mode != "L" and scale > 1:
        image = upscale_by(image, scale, upscaler)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


def extras_upscale(image: PIL.Image.Image, settings: ExtrasUpscale) -> tuple[PIL.Image.Image, dict[str, object]]:
    """A1111's Extras upscale of one RGB or RGBA image (validate `settings` for its size first): the result, and
    the items A1111 writes into its "postprocessing" text, in its order (none when upscaler 1 is "None")."""
    info: dict[str, object] = {}
    if settings.upscaler_1 == "None":
        return image, info
    result = _upscale_once(image, settings, settings.upscaler_1, info)
    info["Postprocess upscaler"] = settings.upscaler_1
    if settings.upscaler_2 != "None" and settings.extras_upscaler_2_visibility > 0:
        second = _upscale_once(image, settings, settings.upscaler_2, {})
        result = PIL.Image.blend(result, second.convert(result.mode), settings.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = settings.upscaler_2
    return result, info


def _upscale_once(image: PIL.Image.Image, settings: ExtrasUpscale, upscaler: str,
                  info: dict[str, object]) -> PIL.Image.Image:
    """One upscaler's result (A1111's postprocessing_upscale `upscale`): scaled, then with resize_mode 1 and crop
    centred on a black canvas of the target size."""
    if settings.resize_mode == 1:
        info["Postprocess upscale to"] = f"{settings.upscaling_resize_w}x{settings.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = settings.upscaling_resize
    image = upscale_by(image, settings.scale_for(image.width, image.height), upscaler)
    if settings.resize_mode == 1 and settings.upscaling_crop:
        width, height = settings.upscaling_resize_w, settings.upscaling_resize_h
        cropped = PIL.Image.new("RGB", (width, height))
        cropped.paste(image, (width // 2 - image.width // 2, height // 2 - image.height // 2))
        image = cropped
        info["Postprocess crop to"] = f"{width}x{height}"
    return image
