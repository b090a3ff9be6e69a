"""The shapes world: determinism, held-out pairs, render geometry and colours, captions and their parser."""

import hashlib
import math
import random
import re

import numpy as np
import pytest
import torch

from sdtorch.data import shapes
from sdtorch.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    Attributes,
    ScenesDataset,
    ShapesDataset,
    allowed_backgrounds,
    caption,
    collate,
    contact_sheet,
    parse_prompt,
    render,
    render_scene,
    sample_attributes,
    sample_scene,
)
from sdtorch.errors import InvalidInputError


def _as_dict(attrs: Attributes) -> dict[str, str]:
    return {k: getattr(attrs, k) for k in ("shape", "colour", "size", "position", "background")}


# ----------------------------------------------------------------------------- sampling


def test_dataset_is_deterministic_in_seed_and_index_and_ignores_global_rngs():
    random.seed(1)
    torch.manual_seed(1)
    first = [ShapesDataset(12, seed=7)[i] for i in range(12)]
    random.seed(2)
    torch.manual_seed(2)
    data = ShapesDataset(12, seed=7)
    again = [data[i] for i in reversed(range(12))][::-1]  # order of access does not matter either
    for a, b in zip(first, again):
        assert a["caption"] == b["caption"] and a["attributes"] == b["attributes"]
        assert torch.equal(a["image"], b["image"])
    other = [ShapesDataset(12, seed=8)[i] for i in range(12)]
    assert [x["caption"] for x in other] != [x["caption"] for x in first]
    assert len({x["caption"] for x in first}) > 6  # items differ from one another


def test_held_out_pairs_are_five_spread_over_shapes_and_colours():
    assert len(HELD_OUT_PAIRS) == 5
    assert len({s for s, _ in HELD_OUT_PAIRS}) == 5 and len({c for _, c in HELD_OUT_PAIRS}) == 5
    assert all(s in SHAPES and c in COLOURS for s, c in HELD_OUT_PAIRS)
    assert "hexagon" not in SHAPES and len(SHAPES) == 6 and len(COLOURS) == 8


def test_splits_keep_held_out_pairs_apart():
    rng = random.Random(0)
    train = {(a.shape, a.colour) for a in (sample_attributes(rng, "train") for _ in range(3000))}
    held = {(a.shape, a.colour) for a in (sample_attributes(rng, "held_out") for _ in range(300))}
    every = {(a.shape, a.colour) for a in (sample_attributes(rng, "all") for _ in range(3000))}
    assert not train & HELD_OUT_PAIRS
    assert len(train) == 48 - 5
    assert held == HELD_OUT_PAIRS
    assert len(every) == 48
    data = ShapesDataset(40, seed=1, split="held_out")
    assert all((x["attributes"].shape, x["attributes"].colour) in HELD_OUT_PAIRS for x in data)
    with pytest.raises(InvalidInputError):
        sample_attributes(rng, "test")
    with pytest.raises(InvalidInputError):
        ShapesDataset(3, split="validation")


def test_every_value_appears_and_backgrounds_contrast_with_the_object():
    rng = random.Random(3)
    drawn = [sample_attributes(rng, "train") for _ in range(2000)]
    for key, values in (
        ("shape", SHAPES),
        ("colour", COLOURS),
        ("size", SIZES),
        ("position", POSITIONS),
        ("background", BACKGROUNDS),
    ):
        assert {getattr(a, key) for a in drawn} == set(values), key
    for a in drawn:
        assert math.dist(COLOURS[a.colour], BACKGROUNDS[a.background]) >= shapes.MIN_CONTRAST
    assert "white" not in allowed_backgrounds("white") and "black" not in allowed_backgrounds("black")
    assert all(len(allowed_backgrounds(c)) >= 2 for c in COLOURS)
    assert len(BACKGROUNDS) >= 4


def test_attributes_reject_unknown_values():
    with pytest.raises(InvalidInputError, match="hexagon"):
        Attributes("hexagon", "red", "small", "center", "white")
    with pytest.raises(InvalidInputError, match="position"):
        Attributes("star", "red", "small", "middle", "white")


# ----------------------------------------------------------------------------- rendering


def _object_mask(pixels: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """(H, W) bool: pixels visibly different from the background (anti-aliased edges included)."""
    return np.abs(pixels.astype(int) - np.array(background)).sum(-1) > 24


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_render_places_and_sizes_each_shape_in_its_grid_cell(shape, size):
    side = {"small": 16, "large": 32}[size]  # a quarter or half of the width, in pixels
    for index, position in enumerate(POSITIONS):
        row, col = divmod(index, 3)
        attrs = Attributes(shape, "red", size, position, "white")
        pixels = np.asarray(render(attrs))
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        ys, xs = np.nonzero(_object_mask(pixels, BACKGROUNDS["white"]))
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1  # bounding box, exclusive ends
        assert x0 >= 1 and y0 >= 1 and x1 <= 63 and y1 <= 63, "the shape stays inside the image"
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert int(cx // (64 / 3)) == col and int(cy // (64 / 3)) == row, (position, cx, cy)
        if size == "small" or position == "center":  # centred on its cell (large corner shapes are moved in)
            assert abs(cx - (col + 0.5) * 64 / 3) <= 1 and abs(cy - (row + 0.5) * 64 / 3) <= 1
        assert max(x1 - x0, y1 - y0) == pytest.approx(side, abs=1.5)
        assert min(x1 - x0, y1 - y0) >= 0.9 * side - 1  # the star is 5% wider than tall


def test_render_draws_the_right_outline():
    """Fill fraction of the bounding box and where the mass sits tell the shapes apart."""
    fill = {}
    for shape in SHAPES:
        pixels = np.asarray(render(Attributes(shape, "black", "large", "center", "white"))).astype(float).mean(-1)
        coverage = (255 - pixels) / (255 - COLOURS["black"][0])  # (64, 64) share of each pixel the shape covers
        box = coverage[16:48, 16:48]  # (32, 32) the large centred shape's bounding box
        assert coverage.sum() == pytest.approx(box.sum(), abs=1)  # nothing outside it
        fill[shape] = box.mean()
        if shape == "triangle":  # apex up: the top rows are nearly empty, the bottom rows nearly full
            assert box[:4].mean() < 0.15 and box[-2:].mean() > 0.85
        if shape == "cross":  # arms reach the edges' middles, corners are empty
            assert box[14:18, :2].mean() > 0.85 and box[:2, 14:18].mean() > 0.85 and box[:8, :8].mean() < 0.05
        if shape == "diamond":  # points at the edges' middles, corners empty
            assert box[15:17, :2].mean() > 0.5 and box[:6, :6].mean() < 0.05
        if shape == "star":  # a point straight up, two lower points with a notch between them
            assert box[2:4, 15:17].mean() > 0.5 and box[:8, :10].max() == 0 and box[:8, -10:].max() == 0
            assert box[-3:, 13:19].mean() < 0.05 and box[-3:-1, 6:9].mean() > 0.3 and box[-3:-1, -9:-6].mean() > 0.3
            assert box[12, :2].mean() > 0.3 and box[12, -2:].mean() > 0.3  # the side points reach the box's edges
    assert fill["square"] > 0.97
    assert fill["circle"] == pytest.approx(math.pi / 4, abs=0.03)
    assert fill["diamond"] == pytest.approx(0.5, abs=0.03) and fill["triangle"] == pytest.approx(0.5, abs=0.03)
    assert fill["cross"] == pytest.approx(5 / 9, abs=0.03)
    assert 0.3 < fill["star"] < 0.45


def test_render_uses_the_object_and_background_colours_with_antialiased_edges():
    for colour, rgb in COLOURS.items():
        for background in allowed_backgrounds(colour):
            pixels = np.asarray(render(Attributes("circle", colour, "large", "bottom right", background)))
            assert tuple(pixels[0, 0]) == BACKGROUNDS[background]
            mask = _object_mask(pixels, BACKGROUNDS[background])
            exact = (pixels == np.array(rgb)).all(-1)
            assert exact.sum() >= 0.85 * mask.sum()  # all but the edge pixels carry the object colour
            assert tuple(pixels[46, 46]) == rgb  # the centre of the bottom-right large circle
            others = mask & ~exact  # edge pixels: blends strictly between background and object
            assert others.sum() > 20
            towards = np.array(rgb) - np.array(BACKGROUNDS[background])
            assert ((pixels[others] - np.array(BACKGROUNDS[background])) @ towards > 0).all()
    assert render(Attributes("star", "red", "small", "center", "gray"), size=128).size == (128, 128)


def test_scenes_paint_objects_in_order_on_one_background():
    one = Attributes("star", "red", "small", "center", "gray")
    assert np.array_equal(np.asarray(render_scene([one])), np.asarray(render(one)))
    below = Attributes("square", "blue", "large", "left", "white")
    above = Attributes("circle", "yellow", "large", "center", "white")
    pixels = np.asarray(render_scene([below, above]))
    assert tuple(pixels[32, 8]) == COLOURS["blue"] and tuple(pixels[32, 32]) == COLOURS["yellow"]
    assert tuple(pixels[32, 20]) == COLOURS["yellow"]  # where the two overlap, the later one shows
    assert tuple(pixels[2, 62]) == BACKGROUNDS["white"]
    with pytest.raises(InvalidInputError, match="same background"):
        render_scene([one, below])
    with pytest.raises(InvalidInputError, match="at least one object"):
        render_scene([])


def test_scene_sampling_covers_one_to_max_objects_of_the_split_that_stand_out():
    rng = random.Random(0)
    scenes = [sample_scene(rng, 4) for _ in range(400)]
    assert {len(s) for s in scenes} == {1, 2, 3, 4}
    for scene in scenes:
        assert len({o.position for o in scene}) == len(scene) and len({o.background for o in scene}) == 1
        assert all((o.shape, o.colour) not in HELD_OUT_PAIRS for o in scene)
        assert all(o.background in allowed_backgrounds(o.colour) for o in scene)
    with pytest.raises(InvalidInputError, match="max_objects"):
        sample_scene(rng, 0)
    with pytest.raises(InvalidInputError, match="max_objects"):
        ScenesDataset(4, max_objects=10)

    data = ScenesDataset(6, seed=3, max_objects=3)
    item = data[5]
    assert item["image"].shape == (3, 64, 64) and 1 <= len(item["objects"]) <= 3
    assert torch.equal(item["image"], ScenesDataset(6, seed=3, max_objects=3)[5]["image"])
    assert len({data.describe(i) for i in range(6)}) > 1
    with pytest.raises(IndexError):
        data[6]


# ----------------------------------------------------------------------------- captions and parsing


def test_parse_prompt_recovers_every_generated_caption():
    rng = random.Random(11)
    named_background = 0
    for _ in range(5000):
        attrs = sample_attributes(rng, "all")
        text = caption(attrs, rng)
        parsed = parse_prompt(text)
        expected = _as_dict(attrs)
        if "background" not in parsed:
            expected.pop("background")
        else:
            named_background += 1
        assert parsed == expected, text
    assert 0.6 * 5000 < named_background < 0.8 * 5000


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a small red star in the top left", dict(shape="star", colour="red", size="small", position="top left")),
        ("A LARGE Blue Circle, Centre", dict(shape="circle", colour="blue", size="large", position="center")),
        (
            "big white cross bottom-right on black",
            dict(shape="cross", colour="white", size="large", position="bottom right", background="black"),
        ),
        (
            "a blue square on light blue, upper right",
            dict(shape="square", colour="blue", position="top right", background="light blue"),
        ),
        (
            "tiny black diamond, grey background, in the middle",
            dict(shape="diamond", colour="black", size="small", position="center", background="gray"),
        ),
        ("a green triangle on the left", dict(shape="triangle", colour="green", position="left")),
        ("an orange plus sign at the bottom center", dict(shape="cross", colour="orange", position="bottom")),
        ("a purple star", dict(shape="star", colour="purple")),
        ("a landscape", {}),
    ],
)
def test_parse_prompt_reads_user_prompts(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_captions_vary_in_template_and_words():
    rng = random.Random(5)
    attrs = Attributes("circle", "orange", "large", "top left", "gray")
    texts = {caption(attrs, rng) for _ in range(400)}
    assert len(texts) >= 100
    word_sets = [r"large|big", r"orange", r"circle|disk", r"(top|upper)[ -]left( corner)?", r"gray|grey"]
    skeletons = set()
    for text in texts:
        for i, pattern in enumerate(word_sets):
            text = re.sub(rf"\b(?:{pattern})\b", f"<{i}>", text)
        skeletons.add(re.sub(r"\b(in|at) the\b", "<in>", text))
    assert len(skeletons) >= len(shapes._TEMPLATES) + 5  # every template, with and without a background
    assert any("top-left" in t for t in texts) and any("upper left" in t for t in texts)
    assert any("big" in t for t in texts) and any("disk" in t for t in texts) and any("grey" in t for t in texts)
    assert any("gray" not in t and "grey" not in t for t in texts)


# ----------------------------------------------------------------------------- dataset


def test_dataset_items_batches_and_bounds():
    data = ShapesDataset(5, seed=2, size=64)
    assert len(data) == 5
    item = data[4]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].min() < 0.5
    assert isinstance(item["caption"], str) and isinstance(item["attributes"], Attributes)
    expected = torch.from_numpy(np.asarray(render(item["attributes"])).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(item["image"], expected, atol=1e-6)
    assert parse_prompt(item["caption"]).items() <= _as_dict(item["attributes"]).items()
    with pytest.raises(IndexError):
        data[5]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4 and len(batch["attributes"]) == 4
    assert torch.equal(batch["image"][1], data[1]["image"])
    assert ShapesDataset(2, size=32)[0]["image"].shape == (3, 32, 32)
    assert data.describe(3) == (data[3]["attributes"], data[3]["caption"])  # the same item, without rendering
    with pytest.raises(IndexError):
        data.describe(-1)


def test_distinct_items_never_repeat_a_picture():
    items = shapes.distinct_items(300, random.Random(1), split="held_out")
    attributes = [item["attributes"] for item in items]
    assert len(set(attributes)) == 300
    assert all((a.shape, a.colour) in shapes.HELD_OUT_PAIRS for a in attributes)
    assert torch.equal(items[7]["image"], torch.from_numpy(
        np.asarray(render(attributes[7])).astype(np.float32) / 127.5 - 1).permute(2, 0, 1))
    with pytest.raises(InvalidInputError, match="fewer than"):
        shapes.distinct_items(10**4, random.Random(1), split="held_out")


def test_contact_sheet_tiles_the_dataset_pictures():
    sheet = contact_sheet(10, seed=4, split="train")
    assert sheet.size == (4 * 66 + 2, 3 * 66 + 2)
    data = ShapesDataset(10, seed=4, split="train")
    tile = np.asarray(sheet)[2 + 66 : 2 + 66 + 64, 2 + 66 : 2 + 66 + 64]  # item 5: row 1, column 1
    assert np.array_equal(tile, np.asarray(render(data[5]["attributes"])))


def test_the_data_stream_is_pinned():
    """Cached latents and resumed training runs rely on (seed, index) -> item never changing: a change to
    sampling, captions or rendering must update these values on purpose."""
    first = ShapesDataset(1, seed=0)[0]
    assert first["caption"] == "at the upper-right corner, a big red cross on a white background"
    assert first["attributes"] == Attributes("cross", "red", "large", "top right", "white")
    digest = hashlib.sha256()
    data = ShapesDataset(200, seed=123, split="all")
    for i in range(len(data)):
        item = data[i]
        digest.update(item["caption"].encode())
        digest.update(render(item["attributes"]).tobytes())
    assert digest.hexdigest() == "5a1856e675be1fddb15db08822074b5071899907a292974b091de66e426898e4"
