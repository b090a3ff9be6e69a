"""The shapes world: deterministic, captioned 64x64 pictures of one filled shape on a plain background.

Every picture is drawn from five attributes (`Attributes`): shape, colour, size, position on a 3x3 grid
and background colour. Captions say the same thing in many words ("a large red circle in the top left",
"red circle, top-left, on gray"), and `parse_prompt` reads the attributes back from any of them. A few
(shape, colour) pairs (`HELD_OUT_PAIRS`) never occur in training, to measure generalisation.

    rng = random.Random(0)
    attrs = sample_attributes(rng, "train")
    image, text = render(attrs), caption(attrs, rng)    # PIL RGB 64x64, str
    parse_prompt(text)                                  # {"shape": ..., "colour": ..., ...}

Everything random takes a `random.Random`; `ShapesDataset` derives one per item from (seed, index).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import PIL.Image
import torch
from PIL import ImageDraw

from ..errors import InvalidInputError
from ..images import image_to_tensor

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")  # "hexagon" is kept for fine-tuning
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "light blue": (170, 200, 235),
}
# (shape, colour) pairs that never occur in training: 5 of 48, no two sharing a shape or a colour.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "purple"), ("square", "orange"), ("triangle", "blue"), ("star", "green"), ("cross", "yellow")}
)
SPLITS = ("train", "held_out", "all")

MIN_CONTRAST = 100.0  # least RGB distance between an object and its background
EXTENT = {"small": 0.25, "large": 0.5}  # side of a shape's bounding box, as a fraction of the image width
MARGIN = 1 / 32  # free border kept between a shape and the image edge, as a fraction of the width
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Attributes:
    """Everything a shapes picture shows; values are the canonical names of the tables above."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
            ("background", BACKGROUNDS),
        ):
            if getattr(self, name) not in allowed:
                raise InvalidInputError(f"unknown {name} {getattr(self, name)!r}; expected one of {sorted(allowed)}")


def allowed_backgrounds(colour: str) -> tuple[str, ...]:
    """Backgrounds far enough (RGB distance >= MIN_CONTRAST) from `colour` for the object to stand out."""
    return tuple(name for name, rgb in BACKGROUNDS.items() if math.dist(rgb, COLOURS[colour]) >= MIN_CONTRAST)


def _pairs(split: str) -> list[tuple[str, str]]:
    """The (shape, colour) pairs a split draws from, in a fixed order."""
    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; expected one of {SPLITS}")
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    if split == "train":
        return [p for p in pairs if p not in HELD_OUT_PAIRS]
    if split == "held_out":
        return [p for p in pairs if p in HELD_OUT_PAIRS]
    return pairs


def sample_attributes(rng: random.Random, split: str = "train") -> Attributes:
    """Draw one picture's attributes: a (shape, colour) pair of the split, then size, position, background."""
    shape, colour = rng.choice(_pairs(split))
    return Attributes(
        shape=shape,
        colour=colour,
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        background=rng.choice(allowed_backgrounds(colour)),
    )


# ----------------------------------------------------------------------------- drawing


def _outline(shape: str) -> list[tuple[float, float]]:
    """Polygon of a shape in unit coordinates: centred on (0, 0), bounding box [-1, 1]^2 (y points down)."""
    if shape == "circle":
        return [(math.cos(2 * math.pi * k / 128), math.sin(2 * math.pi * k / 128)) for k in range(128)]
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "triangle":  # apex up, base along the bottom
        return [(0, -1), (1, 1), (-1, 1)]
    if shape == "diamond":
        return [(0, -1), (1, 0), (0, 1), (-1, 0)]
    if shape == "cross":  # a plus sign with arms a third of the extent thick
        t = 1 / 3
        return [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    if shape == "star":  # five points, one up; uniformly scaled so its bounding box is centred and fits
        inner = 0.45
        points = [
            ((1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / 5), -(1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / 5))
            for k in range(10)
        ]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        mid_x, mid_y = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        scale = 2 / max(max(xs) - min(xs), max(ys) - min(ys))
        return [((x - mid_x) * scale, (y - mid_y) * scale) for x, y in points]
    raise InvalidInputError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_box(attrs: Attributes) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the shape's bounding box as fractions of the image width.

    The centre is the centre of the position's grid cell, moved inwards only as far as needed to keep the
    shape MARGIN away from the image edge (a large shape cannot be centred on a corner cell).
    """
    row, col = divmod(POSITIONS.index(attrs.position), 3)
    side = EXTENT[attrs.size]
    lo, hi = side / 2 + MARGIN, 1 - side / 2 - MARGIN
    return min(max((col + 0.5) / 3, lo), hi), min(max((row + 0.5) / 3, lo), hi), side


def render(attrs: Attributes, size: int = 64) -> PIL.Image.Image:
    """Draw the picture `attrs` describe: a size x size RGB image, anti-aliased by 4x supersampling."""
    big = size * SUPERSAMPLE
    image = PIL.Image.new("RGB", (big, big), BACKGROUNDS[attrs.background])
    cx, cy, side = shape_box(attrs)
    half = side / 2 * big  # supersampled pixels from the centre to the bounding box's edge
    polygon = [(cx * big + x * half, cy * big + y * half) for x, y in _outline(attrs.shape)]
    ImageDraw.Draw(image).polygon(polygon, fill=COLOURS[attrs.colour])
    return image.reduce(SUPERSAMPLE)  # box filter: each pixel is the mean of its 4x4 block


# ----------------------------------------------------------------------------- captions

# Words captions use for each value, canonical first; repeats weight the canonical word.
_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big", "big")}
_SHAPE_WORDS = {
    "circle": ("circle", "circle", "circle", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "diamond", "diamond", "rhombus"),
    "star": ("star",),
    "cross": ("cross", "cross", "cross", "plus sign"),
}
_BACKGROUND_WORDS = {"white": ("white",), "gray": ("gray", "gray", "grey"), "black": ("black",), "light blue": ("light blue",)}
_VERTICAL = {"top": ("top", "top", "upper"), "bottom": ("bottom", "bottom", "lower")}
_EDGE_PHRASES = {  # (with a preposition, bare)
    "top": (("at the top", "at the top center", "at the top centre", "in the top middle", "near the top"), ("top", "top center", "top middle")),
    "bottom": (
        ("at the bottom", "at the bottom center", "at the bottom centre", "in the bottom middle", "near the bottom"),
        ("bottom", "bottom center", "bottom middle"),
    ),
    "left": (("on the left", "on the left side", "at the left", "in the middle left", "near the left edge"), ("left", "middle left", "left side")),
    "right": (
        ("on the right", "on the right side", "at the right", "in the middle right", "near the right edge"),
        ("right", "middle right", "right side"),
    ),
    "center": (("in the center", "in the centre", "in the middle", "at the center"), ("center", "centre", "middle")),
}
_TEMPLATES = (
    "{a_obj} {where}{on_bg}",
    "{obj}, {pos}{comma_bg}",
    "{where}, {a_obj}{on_bg}",
    "there is {a_obj} {where}{on_bg}",
    "a picture of {a_obj} {where}{on_bg}",
    "an image showing {a_obj} {where}{on_bg}",
    "{a_obj}{on_bg}, {where}",
    "{a_obj} placed {where}{on_bg}",
    "{colour} {shape}, {size}, {pos}{comma_bg}",
    "{a_colour_shape} that is {size}, {where}{on_bg}",
    "{bg_lead}{a_obj} {where}",
)
_BACKGROUND_OMITTED = 0.3  # share of captions that do not name the background


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _position_words(position: str, rng: random.Random, bare: bool) -> str:
    if position in _EDGE_PHRASES:
        return rng.choice(_EDGE_PHRASES[position][bare])
    vertical, horizontal = position.split()
    words = rng.choice(_VERTICAL[vertical]) + rng.choice((" ", "-")) + horizontal
    if bare:
        return words
    return rng.choice(("in the ", "at the ")) + words + rng.choice(("", " corner"))


def caption(attrs: Attributes, rng: random.Random) -> str:
    """A caption of `attrs` in one of many phrasings; always names shape, colour, size and position,
    and the background in about 70% of captions."""
    size, colour, shape = rng.choice(_SIZE_WORDS[attrs.size]), attrs.colour, rng.choice(_SHAPE_WORDS[attrs.shape])
    show_background = rng.random() >= _BACKGROUND_OMITTED
    bg = rng.choice(_BACKGROUND_WORDS[attrs.background])
    on_bg = rng.choice((f" on {bg}", f" on a {bg} background", f" against a {bg} background", f" with a {bg} background", f", {bg} background"))
    comma_bg = rng.choice((f", on {bg}", f", {bg} background"))
    fields = dict(
        obj=f"{size} {colour} {shape}",
        a_obj=_a(f"{size} {colour} {shape}"),
        a_colour_shape=_a(f"{colour} {shape}"),
        colour=colour,
        shape=shape,
        size=size,
        where=_position_words(attrs.position, rng, bare=False),
        pos=_position_words(attrs.position, rng, bare=True),
        on_bg=on_bg if show_background else "",
        comma_bg=comma_bg if show_background else "",
        bg_lead=f"on a {bg} background, " if show_background else "",
    )
    return rng.choice(_TEMPLATES).format(**fields)


# ----------------------------------------------------------------------------- parsing

_SPELLINGS = {"grey": "gray", "centre": "center", "centered": "center", "centred": "center", "middle": "center", "upper": "top", "lower": "bottom"}


def _alternation(words: dict[str, tuple[str, ...]]) -> tuple[re.Pattern, dict[str, str]]:
    """A regex matching any of the words (whole words, longest first) and a word -> canonical value map."""
    lookup = {word: value for value, synonyms in words.items() for word in synonyms}
    pattern = "|".join(re.escape(w) for w in sorted(lookup, key=len, reverse=True))
    return re.compile(rf"\b({pattern})\b"), lookup


_SIZE_RE = _alternation(_SIZE_WORDS)
_SHAPE_RE = _alternation(_SHAPE_WORDS)
_COLOUR_RE = _alternation({c: (c,) for c in COLOURS})
_BG_NAMES = "|".join(sorted((re.escape(n) for n in BACKGROUNDS), key=len, reverse=True))
_BACKGROUND_RE = re.compile(rf"\b(?:(?:on|against)(?: an?| the)?(?: plain)? ({_BG_NAMES})(?: background)?|({_BG_NAMES}) background)\b")


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a prompt asks for, as canonical values, keyed by the attribute names among
    shape/colour/size/position/background; attributes the prompt does not mention are absent.

    Understands every caption `caption` writes and plain prompts such as "a small red star in the top left".
    """
    words = [_SPELLINGS.get(w, w) for w in re.sub(r"[^a-z]+", " ", text.lower()).split()]
    line = " ".join(words)
    found: dict[str, str] = {}
    background = _BACKGROUND_RE.search(line)
    if background:  # taken out first, so its colour word is not read as the object's
        found["background"] = background.group(1) or background.group(2)
        line = line[: background.start()] + " " + line[background.end() :]
    for key, (pattern, lookup) in (("shape", _SHAPE_RE), ("colour", _COLOUR_RE), ("size", _SIZE_RE)):
        match = pattern.search(line)
        if match:
            found[key] = lookup[match.group(1)]
    tokens = line.split()
    vertical = next((t for t in tokens if t in ("top", "bottom")), None)
    horizontal = next((t for t in tokens if t in ("left", "right")), None)
    if vertical or horizontal:
        found["position"] = " ".join(t for t in (vertical, horizontal) if t)
    elif "center" in tokens:
        found["position"] = "center"
    return found


# ----------------------------------------------------------------------------- datasets


def item_rng(seed: int, index: int) -> random.Random:
    """The random stream of item `index` of the dataset seeded `seed` (str seeds hash by SHA-512: stable everywhere)."""
    return random.Random(f"sdtorch.shapes:{seed}:{index}")


class ShapesDataset(torch.utils.data.Dataset):
    """`length` captioned renders; item i depends only on (seed, i), never on global random state.

    An item is dict(image=(3, size, size) float32 in [-1, 1], caption=str, attributes=Attributes);
    batch items with `collate` (torch's default collate does not know `Attributes`).
    """

    def __init__(self, length: int, seed: int = 0, split: str = "train", size: int = 64):
        _pairs(split)  # validates the split
        if length < 0 or size < 8:
            raise InvalidInputError(f"need length >= 0 and size >= 8, got length={length}, size={size}")
        self.length, self.seed, self.split, self.size = length, seed, split, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        rng = item_rng(self.seed, index)
        attrs = sample_attributes(rng, self.split)
        return {"image": image_to_tensor(render(attrs, self.size))[0], "caption": caption(attrs, rng), "attributes": attrs}


def collate(items: list[dict]) -> dict:
    """Batch dataset items: image (B, 3, H, W), caption list[str], attributes list[Attributes]."""
    return {
        "image": torch.stack([item["image"] for item in items]),  # (B, 3, H, W)
        "caption": [item["caption"] for item in items],
        "attributes": [item["attributes"] for item in items],
    }


def contact_sheet(n: int, seed: int = 0, split: str = "all", size: int = 64, gap: int = 2) -> PIL.Image.Image:
    """The pictures of the first n items of ShapesDataset(n, seed, split) tiled in a near-square grid, for looking at."""
    columns = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    sheet = PIL.Image.new("RGB", (columns * (size + gap) + gap, rows * (size + gap) + gap), (255, 0, 255))
    for i in range(n):
        rng = item_rng(seed, i)
        row, col = divmod(i, columns)
        sheet.paste(render(sample_attributes(rng, split), size), (gap + col * (size + gap), gap + row * (size + gap)))
    return sheet
