"""Images over HTTP: base64 in (raw or a `data:` URI, as A1111 accepts), base64 PNGs out (with their parameters)."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from ..errors import InvalidInputError
from ..images import load_image
from ..infotext import png_info

_DATA_URI = re.compile(r"data:[\w/+.-]*(;[\w=-]+)*;base64,", re.IGNORECASE)


def decode_base64(text: str, what: str) -> bytes:
    """The bytes of a base64 string or `data:...;base64,` URI; InvalidInputError naming `what` if it is neither.

    Nothing is fetched: a URL is refused like any other text that is not base64. Whether the bytes are an
    image is for the image loader to say.
    """
    text = text.strip()
    match = _DATA_URI.match(text)
    if match is not None:
        text = text[match.end():]
    elif text.lower().startswith("data:"):
        raise InvalidInputError(f"{what}: a data: URI must be base64 (data:image/png;base64,...)")
    text = "".join(text.split())  # line-wrapped base64
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)  # padding may be left off
    except (binascii.Error, ValueError):
        raise InvalidInputError(f"{what} is not valid base64 (nor a data: URI)") from None
    if not data:
        raise InvalidInputError(f"{what} is empty")
    return data


def image_bytes(text: str, what: str) -> bytes:
    """The bytes of a base64 image, checked here to be an image Pillow decodes (so the error names the field)."""
    data = decode_base64(text, what)
    try:
        load_image(data)
    except InvalidInputError as e:
        raise InvalidInputError(f"{what}: {e}") from None
    return data


def encode_png(image: Image.Image) -> str:
    """Raw base64 (no data: prefix) of `image` as a PNG carrying its `info["parameters"]` text (and A1111's Extras
    `info["postprocessing"]` text where it has one)."""
    buffer = io.BytesIO()
    pnginfo = png_info(image.info.get("parameters", ""), image.info.get("postprocessing", ""))
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
