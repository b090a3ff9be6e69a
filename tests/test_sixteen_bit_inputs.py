"""16-bit init images and masks give the same picture as their 8-bit equivalents, through the API and the CLI."""

import numpy as np
import pytest
from PIL import Image

import sdtorch
from sdtorch.cli import main

SIZE = 64


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load()  # the built-in model: 64 px, fast


def _gradients(tmp_path):
    """A 16-bit greyscale picture and mask on disk, and their 8-bit equivalents (value * 255 / 65535, rounded)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    picture = ((x * 1023 + y * 17) % 65536).astype(np.uint16)  # uses the whole 16-bit range
    mask = np.where(x > SIZE // 2, 65535, 100).astype(np.uint16)  # 100/65535: black in 8 bits; 100/255 if clipped
    paths = {}
    for name, values in (("image", picture), ("mask", mask)):
        deep = tmp_path / f"{name}16.png"
        Image.fromarray(values).save(deep)  # reopens as mode I;16
        eight = tmp_path / f"{name}8.png"
        Image.fromarray(np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)).save(eight)
        assert Image.open(deep).mode == "I;16" and Image.open(eight).mode == "L"
        paths[name] = (deep, eight)
    return paths


def _pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if not isinstance(image, Image.Image) else image)


def test_sixteen_bit_image_and_mask_through_the_api(pipe, tmp_path):
    paths = _gradients(tmp_path)
    settings = dict(steps=4, seed=5, denoising_strength=0.6, mask_blur=0)
    deep = pipe("a red circle", init_image=paths["image"][0], mask=paths["mask"][0], **settings)[0]
    eight = pipe("a red circle", init_image=paths["image"][1], mask=paths["mask"][1], **settings)[0]
    assert np.array_equal(_pixels(deep), _pixels(eight))
    # the mask kept its black half: pixels there are the original's (mask overlay), not partly repainted
    original = np.asarray(Image.open(paths["image"][1]).convert("RGB"))
    assert np.array_equal(_pixels(deep)[:, : SIZE // 2], original[:, : SIZE // 2])


def test_sixteen_bit_image_through_the_cli(tmp_path):
    paths = _gradients(tmp_path)
    outputs = []
    for deep_or_eight in (0, 1):
        out = tmp_path / f"out{deep_or_eight}.png"
        code = main(["generate", "a blue square", "--init-image", str(paths["image"][deep_or_eight]), "--steps", "4",
                     "--seed", "3", "--strength", "0.5", "--out", str(out), "--quiet"])
        assert code == 0
        outputs.append(_pixels(out))
    assert np.array_equal(outputs[0], outputs[1])
