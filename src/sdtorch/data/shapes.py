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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ..errors import InvalidInputError
from ..images import image_to_tensor

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")  # "hexagon" is kept for fine-tuning
DRAWABLE = (*SHAPES, "hexagon")  # what render() can draw; hexagon is kept out of the data on purpose
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
SUPERSAMPLE = 4  # coverage samples per pixel along each axis (anti-aliasing)
STAR_INNER_RADIUS = 0.45  # of the outer radius: a little fatter than a regular pentagram (0.38), clearer when small


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


def sample_scene(rng: random.Random, max_objects: int, split: str = "train") -> tuple[Attributes, ...]:
    """Draw a scene: a background, then 1 to `max_objects` objects of the split's pairs that stand out on it,
    at distinct positions (large neighbours may still overlap)."""
    if not 1 <= max_objects <= len(POSITIONS):
        raise InvalidInputError(f"max_objects must be 1 to {len(POSITIONS)}, got {max_objects}")
    background = rng.choice(tuple(BACKGROUNDS))
    pairs = [p for p in _pairs(split) if background in allowed_backgrounds(p[1])]
    positions = rng.sample(POSITIONS, rng.randint(1, max_objects))
    return tuple(
        Attributes(*rng.choice(pairs), size=rng.choice(SIZES), position=position, background=background)
        for position in positions
    )


# ----------------------------------------------------------------------------- drawing


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of a polygonal shape in unit coordinates: centred on (0, 0), bounding box [-1, 1]^2 (y down)."""
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "triangle":  # apex up, base along the bottom
        return [(0, -1), (1, 1), (-1, 1)]
    if shape == "diamond":
        return [(0, -1), (1, 0), (0, 1), (-1, 0)]
    if shape == "cross":  # a plus sign whose arms are a third of the extent thick
        t = 1 / 3
        return [
            (-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),  # top arm, right arm (clockwise)
            (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t),  # bottom arm, left arm
        ]
    if shape == "star":  # five points, one up; scaled uniformly so that its bounding box is centred and fits
        radii = [1.0 if k % 2 == 0 else STAR_INNER_RADIUS for k in range(10)]
        points = [(r * math.sin(math.pi * k / 5), -r * math.cos(math.pi * k / 5)) for k, r in enumerate(radii)]
        xs, ys = [x for x, _ in points], [y for _, y in points]
        mid_x, mid_y = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        scale = 2 / max(max(xs) - min(xs), max(ys) - min(ys))
        return [((x - mid_x) * scale, (y - mid_y) * scale) for x, y in points]
    if shape == "hexagon":  # regular, one vertex up, circumradius 1 (the shape fine-tuning teaches)
        w = math.sqrt(3) / 2
        return [(0, -1), (w, -0.5), (w, 0.5), (0, 1), (-w, 0.5), (-w, -0.5)]
    raise InvalidInputError(f"unknown shape {shape!r}; expected one of {DRAWABLE}")


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v) in unit coordinates (broadcast against each other) the shape covers."""
    if shape == "circle":
        return u * u + v * v < 1.0
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    polygon = _polygon(shape)
    for (u0, v0), (u1, v1) in zip(polygon, polygon[1:] + polygon[:1]):  # even-odd rule: count edge crossings
        if v0 == v1:
            continue  # a horizontal edge crosses no horizontal ray
        spans = (v0 <= v) != (v1 <= v)  # the edge spans this row
        inside ^= spans & (u < u0 + (v - v0) * (u1 - u0) / (v1 - v0))  # ...left of the point's ray to +u
    return inside


def shape_box(attrs: Attributes) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the shape's bounding box as fractions of the image width.

    The centre is the centre of the position's grid cell, moved inwards only as far as needed to keep the
    shape MARGIN away from the image edge (a large shape cannot be centred on a corner cell).
    """
    row, col = divmod(POSITIONS.index(attrs.position), 3)
    side = EXTENT[attrs.size]
    lo, hi = side / 2 + MARGIN, 1 - side / 2 - MARGIN
    return min(max((col + 0.5) / 3, lo), hi), min(max((row + 0.5) / 3, lo), hi), side


def _paint(pixels: np.ndarray, attrs: Attributes, shape: str | None = None) -> np.ndarray:
    """`pixels` (size, size, 3) float with the object of `attrs` blended over them by its coverage.

    Anti-aliased by supersampling: each pixel's coverage is the share of a SUPERSAMPLE x SUPERSAMPLE grid
    of points inside it that the shape covers (a box filter over a 4x render). The shape is sampled exactly
    at those points; PIL's polygon fill would snap vertices to whole pixels and fill its closing edges.
    """
    size = pixels.shape[0]
    cx, cy, side = shape_box(attrs)
    samples = (np.arange(size * SUPERSAMPLE) + 0.5) / (size * SUPERSAMPLE)  # (S,) sample coordinates / width
    u = (samples[None, :] - cx) / (side / 2)  # (1, S) unit coordinates across
    v = (samples[:, None] - cy) / (side / 2)  # (S, 1) unit coordinates down
    covered = _inside(shape or attrs.shape, u, v)  # (S, S) bool
    coverage = covered.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]  # (size, size, 1)
    return pixels + coverage * (np.array(COLOURS[attrs.colour], float) - pixels)


def _canvas(background: str, size: int) -> np.ndarray:
    return np.broadcast_to(np.array(BACKGROUNDS[background], float), (size, size, 3))


def _image(pixels: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


def render(attrs: Attributes, size: int = 64, shape: str | None = None) -> PIL.Image.Image:
    """Draw the picture `attrs` describe: a size x size RGB image, the object anti-aliased (see `_paint`).

    `shape` draws another outline in the same place and style: "hexagon", which the world never samples
    (fine-tuning teaches it), is drawable this way.
    """
    return _image(_paint(_canvas(attrs.background, size), attrs, shape))


def render_scene(objects: Sequence[Attributes], size: int = 64) -> PIL.Image.Image:
    """Draw several objects on their common background, in order (later ones cover earlier ones)."""
    if not objects or len({o.background for o in objects}) != 1:
        raise InvalidInputError("a scene needs at least one object, all on the same background")
    pixels = _canvas(objects[0].background, size)
    for attrs in objects:
        pixels = _paint(pixels, attrs)
    return _image(pixels)


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
_BACKGROUND_WORDS = {
    "white": ("white",),
    "gray": ("gray", "gray", "grey"),
    "black": ("black",),
    "light blue": ("light blue",),
}
_VERTICAL = {"top": ("top", "top", "upper"), "bottom": ("bottom", "bottom", "lower")}
_EDGE_PHRASES = {  # position -> (phrases with a preposition, bare phrases)
    "top": (
        ("at the top", "near the top", "at the top center", "at the top centre", "in the top middle"),
        ("top", "top center", "top middle"),
    ),
    "bottom": (
        ("at the bottom", "near the bottom", "at the bottom center", "at the bottom centre", "in the bottom middle"),
        ("bottom", "bottom center", "bottom middle"),
    ),
    "left": (
        ("on the left", "on the left side", "at the left", "in the middle left", "near the left edge"),
        ("left", "middle left", "left side"),
    ),
    "right": (
        ("on the right", "on the right side", "at the right", "in the middle right", "near the right edge"),
        ("right", "middle right", "right side"),
    ),
    "center": (
        ("in the center", "in the centre", "in the middle", "at the center"),
        ("center", "centre", "middle"),
    ),
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
    on_bg = rng.choice((f" on {bg}", f", {bg} background", f" on a {bg} background", f" against a {bg} background",
                        f" with a {bg} background"))
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

_SPELLINGS = {  # word -> the word parse_prompt reads it as
    "grey": "gray",
    "centre": "center",
    "centered": "center",
    "centred": "center",
    "middle": "center",
    "upper": "top",
    "lower": "bottom",
}


def _alternation(words: dict[str, tuple[str, ...]]) -> tuple[re.Pattern, dict[str, str]]:
    """A regex matching any of the words (whole words, longest first) and a word -> canonical value map."""
    lookup = {word: value for value, synonyms in words.items() for word in synonyms}
    pattern = "|".join(re.escape(w) for w in sorted(lookup, key=len, reverse=True))
    return re.compile(rf"\b({pattern})\b"), lookup


_SIZE_RE = _alternation(_SIZE_WORDS)
_SHAPE_RE = _alternation(_SHAPE_WORDS)
_COLOUR_RE = _alternation({c: (c,) for c in COLOURS})
_BG_NAMES = "|".join(sorted((re.escape(n) for n in BACKGROUNDS), key=len, reverse=True))
_BACKGROUND_RE = re.compile(  # "on gray", "against a plain white background", "light blue background"
    rf"\b(?:(?:on|against)(?: an?| the)?(?: plain)? ({_BG_NAMES})(?: background)?|({_BG_NAMES}) background)\b"
)


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
    """The random stream of item `index` of the dataset seeded `seed` (a str seed is hashed by SHA-512: stable
    across processes and platforms, unlike hash())."""
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

    def describe(self, index: int) -> tuple[Attributes, str]:
        """Item `index`'s attributes and caption, without rendering it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        rng = item_rng(self.seed, index)
        attrs = sample_attributes(rng, self.split)
        return attrs, caption(attrs, rng)

    def __getitem__(self, index: int) -> dict:
        attrs, text = self.describe(index)
        return _item(attrs, text, self.size)


class ScenesDataset(torch.utils.data.Dataset):
    """`length` uncaptioned pictures of 1 to `max_objects` objects each (`sample_scene`): autoencoder training
    data with more shape edges per pixel than ShapesDataset's one object on a mostly empty background.

    An item is dict(image=(3, size, size) float32 in [-1, 1], objects=tuple of Attributes); item i depends
    only on (seed, i).
    """

    def __init__(self, length: int, seed: int = 0, split: str = "train", size: int = 64, max_objects: int = 4):
        sample_scene(random.Random(0), max_objects, split)  # validates max_objects and the split
        if length < 0 or size < 8:
            raise InvalidInputError(f"need length >= 0 and size >= 8, got length={length}, size={size}")
        self.length, self.seed, self.split, self.size, self.max_objects = length, seed, split, size, max_objects

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> tuple[Attributes, ...]:
        """Item `index`'s objects, without rendering them."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ScenesDataset of length {self.length}")
        return sample_scene(random.Random(f"sdtorch.scenes:{self.seed}:{index}"), self.max_objects, self.split)

    def __getitem__(self, index: int) -> dict:
        objects = self.describe(index)
        return {"image": image_to_tensor(render_scene(objects, self.size))[0], "objects": objects}


def _item(attrs: Attributes, text: str, size: int) -> dict:
    """A dataset item: image (3, size, size) in [-1, 1], caption, attributes."""
    return {"image": image_to_tensor(render(attrs, size))[0], "caption": text, "attributes": attrs}


def distinct_items(count: int, rng: random.Random, split: str = "train", size: int = 64) -> list[dict]:
    """`count` items (as ShapesDataset's) whose attribute sets all differ: no two pictures are the same."""
    seen: set[Attributes] = set()
    items = []
    for _ in range(count * 100):
        if len(items) == count:
            break
        attrs = sample_attributes(rng, split)
        if attrs in seen:
            continue
        seen.add(attrs)
        items.append(_item(attrs, caption(attrs, rng), size))
    if len(items) < count:
        raise InvalidInputError(f"the {split} split has fewer than {count} distinct pictures")
    return items


def collate(items: list[dict]) -> dict:
    """Batch dataset items: image (B, 3, H, W), caption list[str], attributes list[Attributes]."""
    return {
        "image": torch.stack([item["image"] for item in items]),  # (B, 3, H, W)
        "caption": [item["caption"] for item in items],
        "attributes": [item["attributes"] for item in items],
    }


def contact_sheet(n: int, seed: int = 0, split: str = "all", size: int = 64, gap: int = 2) -> PIL.Image.Image:
    """The pictures of the first n items of ShapesDataset(n, seed, split), tiled in a near-square grid to look at."""
    columns = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    sheet = PIL.Image.new("RGB", (columns * (size + gap) + gap, rows * (size + gap) + gap), (255, 0, 255))
    for i in range(n):
        rng = item_rng(seed, i)
        row, col = divmod(i, columns)
        sheet.paste(render(sample_attributes(rng, split), size), (gap + col * (size + gap), gap + row * (size + gap)))
    return sheet
