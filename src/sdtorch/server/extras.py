"""A1111's Extras endpoints (`/sdapi/v1/extra-single-image`, `extra-batch-images`): every image decoded and every
setting checked before any work (422 naming the field or the image), then each image upscaled
(upscaling.extras_upscale) and returned as a PNG carrying its source's parameters text and A1111's "postprocessing"
text, as A1111 returns them."""

from __future__ import annotations

import html
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel

from ..errors import InvalidInputError
from ..images import load_image_with_alpha
from ..infotext import format_items, read_infotext
from ..request import ExtrasUpscale, Limits
from ..upscaling import extras_upscale
from .encoding import decode_base64, encode_png
from .schemas import EXTRAS_TABLE


@dataclass
class ExtrasJob:
    """Checked images and settings, ready to upscale."""

    settings: ExtrasUpscale
    images: list[tuple[Image.Image, str]]  # (RGB or RGBA image, its parameters text or "")


def plan_extras(payload: BaseModel, images: list[tuple[str, str]], limits: Limits) -> ExtrasJob:
    """The job for an Extras payload and its images as (base64, what the error calls it); InvalidInputError naming
    the field or the image for anything wrong (too many images, undecodable, a result over max_upscaled_side)."""
    if len(images) > limits.max_batch:
        raise InvalidInputError(f"imageList has {len(images)} images, over the limit max_batch={limits.max_batch}")
    settings = ExtrasUpscale(**{name: getattr(payload, name) for name in EXTRAS_TABLE})
    checked = []
    for text, what in images:
        data = decode_base64(text, what)
        try:
            image = load_image_with_alpha(data)
        except InvalidInputError as error:
            raise InvalidInputError(f"{what}: {error}") from None
        settings.validate(limits, image.width, image.height, where="" if len(images) == 1 else f"{what}: ")
        checked.append((image, read_infotext(data) or ""))
    return ExtrasJob(settings, checked)


def run_extras(job: ExtrasJob) -> tuple[list[str], str]:
    """(base64 PNGs, html_info: the last image's postprocessing text as A1111's HTML paragraph)."""
    encoded, text = [], ""
    for image, parameters in job.images:
        result, items = extras_upscale(image, job.settings)
        text = format_items(items)
        result = result.copy() if result is image else result  # its own info, the source's left alone
        result.info = {"parameters": parameters, "postprocessing": text}
        encoded.append(encode_png(result))
    return encoded, f"<p>{html.escape(text)}</p>"
