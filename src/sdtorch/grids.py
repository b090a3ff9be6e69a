"""Labelled image grids: pictures in rows of `columns`, each with its label (a prompt) under it."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

_GAP, _LINE_HEIGHT, _MIN_SIDE = 8, 11, 192


def image_grid(images: Sequence[Image.Image], labels: Sequence[str], columns: int = 4, scale: int | None = None,
               label_lines: int = 3) -> Image.Image:
    """The images (one size) `columns` to a row, each upscaled `scale` times (nearest; default: to at least
    192 pixels wide) with its label wrapped under it in up to `label_lines` lines."""
    if not images or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (at least one), got {len(images)} and {len(labels)}")
    scale = scale or max(1, -(-_MIN_SIDE // images[0].width))
    width, height = images[0].width * scale, images[0].height * scale
    columns = min(columns, len(images))
    label_height = label_lines * _LINE_HEIGHT + 6
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (width + _GAP) + _GAP, rows * (height + label_height + _GAP) + _GAP), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    chars = max(8, width // 7)
    for i, (image, label) in enumerate(zip(images, labels)):
        row, col = divmod(i, columns)
        x, y = _GAP + col * (width + _GAP), _GAP + row * (height + label_height + _GAP)
        grid.paste(image.convert("RGB").resize((width, height), Image.NEAREST), (x, y))
        lines = textwrap.wrap(label, chars)[:label_lines]
        draw.multiline_text((x, y + height + 3), "\n".join(lines), fill="black", font=font, spacing=1)
    return grid
