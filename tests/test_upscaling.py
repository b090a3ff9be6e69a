"""Model-free upscaling as A1111 does it: latent modes, pixel upscalers, the Extras upscale and its checks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdtorch
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import format_items, read_infotext
from sdtorch.request import HIRES_UPSCALERS, LATENT_UPSCALERS, ExtrasUpscale, Limits
from sdtorch.upscaling import extras_upscale, resize_with, upscale_by, upscale_latents

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_latent_modes():
    latents = torch.randn(2, 4, 8, 6)
    nearest = upscale_latents(latents, 16, 12, "Latent (nearest)")
    assert torch.equal(nearest, latents.repeat_interleave(2, 2).repeat_interleave(2, 3))  # each value a 2x2 block
    assert torch.equal(upscale_latents(latents, 16, 12, "Latent (nearest-exact)"), nearest)  # same at exactly 2x
    bilinear = upscale_latents(latents, 16, 12, "Latent")
    # half-pixel centres (align_corners False): output 1 sits a quarter of the way from input 0 to input 1
    assert torch.allclose(bilinear[:, :, 1, 1], latents[:, :, 0, 0] * 0.5625 + latents[:, :, 0, 1] * 0.1875
                          + latents[:, :, 1, 0] * 0.1875 + latents[:, :, 1, 1] * 0.0625, atol=1e-6)
    bicubic = upscale_latents(latents, 16, 12, "Latent (bicubic)")
    assert not torch.allclose(bicubic, bilinear) and bicubic.shape == (2, 4, 16, 12)
    # bilinear antialiasing filters only when shrinking: enlarging gives the plain mode's values
    assert torch.allclose(upscale_latents(latents, 16, 12, "Latent (antialiased)"), bilinear, atol=1e-6)
    assert upscale_latents(latents, 16, 12, "Latent (bicubic antialiased)").shape == (2, 4, 16, 12)
    plain_small = upscale_latents(latents, 4, 3, "Latent")
    assert torch.allclose(plain_small, F.avg_pool2d(latents, 2), atol=1e-6)  # a 2x shrink samples between 4 pixels
    assert upscale_latents(latents, 4, 3, "Latent (antialiased)").std() < plain_small.std()  # a wider filter
    assert set(LATENT_UPSCALERS) < set(HIRES_UPSCALERS)


def test_pixel_upscalers_follow_a1111_steps():
    image = noise_image(40, 24)
    # Nearest at 2x: every pixel becomes a 2x2 block, nothing else touches it
    doubled = pixels(upscale_by(image, 2, "Nearest"))
    assert np.array_equal(doubled, pixels(image).repeat(2, 0).repeat(2, 1))
    # Lanczos at 2x: one Lanczos resize; "None": the final Lanczos resize alone, so the same picture
    assert np.array_equal(pixels(upscale_by(image, 2, "Lanczos")), pixels(image.resize((80, 48), LANCZOS)))
    assert np.array_equal(pixels(upscale_by(image, 2, "None")), pixels(image.resize((80, 48), LANCZOS)))
    # 1.5x: the target floors to multiples of 8 (60x36 -> 56x32): the upscaler's own 60x36, then Lanczos to 56x32
    nearest = upscale_by(image, 1.5, "Nearest")
    assert nearest.size == (56, 32)
    assert np.array_equal(pixels(nearest), pixels(image.resize((60, 36), NEAREST).resize((56, 32), LANCZOS)))
    # shrinking: the target already covered, only the Lanczos resize runs
    assert np.array_equal(pixels(upscale_by(image, 0.5, "Nearest")), pixels(image.resize((16, 8), LANCZOS)))


def test_resize_with_reaches_the_exact_size():
    image = noise_image(40, 24)
    out = resize_with(image, 84, 50, "Nearest")  # scale 2.1: 84x50 -> 80x48 by the upscaler, then Lanczos to 84x50
    assert out.size == (84, 50)
    expected = image.resize((84, 50), NEAREST).resize((80, 48), LANCZOS).resize((84, 50), LANCZOS)
    assert np.array_equal(pixels(out), pixels(expected))
    assert np.array_equal(pixels(resize_with(image, 80, 48, "None")), pixels(image.resize((80, 48), LANCZOS)))


def test_extras_scale_by_and_its_info():
    image = noise_image(40, 24)
    settings = ExtrasUpscale(upscaler_1="Nearest", upscaling_resize=3).validate(Limits(), 40, 24)
    out, info = extras_upscale(image, settings)
    assert out.size == settings.output_size(40, 24) == (120, 72)
    assert np.array_equal(pixels(out), pixels(image).repeat(3, 0).repeat(3, 1))
    assert list(info) == ["Postprocess upscale by", "Postprocess upscaler"]
    assert format_items(info) == "Postprocess upscale by: 3, Postprocess upscaler: Nearest"
    unchanged, none = extras_upscale(image, ExtrasUpscale())  # upscaler 1 "None": nothing happens, nothing said
    assert unchanged is image and none == {}


def test_extras_scale_to_with_crop_and_blend():
    image = noise_image(64, 32)
    settings = ExtrasUpscale(resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100, upscaler_1="Lanczos",
                             upscaler_2="Nearest", extras_upscaler_2_visibility=0.25).validate(Limits(), 64, 32)
    out, info = extras_upscale(image, settings)
    # scale max(100/64, 100/32) = 3.125: 200x100, floored to 200x96, centred on a black 100x100 canvas
    assert out.size == (100, 100)
    first = image.resize((200, 100), LANCZOS).resize((200, 96), LANCZOS)
    second = image.resize((200, 100), NEAREST).resize((200, 96), LANCZOS)
    blended = Image.blend(first, second, 0.25).crop((50, -2, 150, 98))
    assert np.array_equal(pixels(out), pixels(blended))
    assert (pixels(out)[:2] == 0).all() and (pixels(out)[-2:] == 0).all()  # the 2-pixel bands the picture misses
    assert format_items(info) == ("Postprocess upscale to: 100x100, Postprocess crop to: 100x100, "
                                  "Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest")
    uncropped = ExtrasUpscale(resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100, upscaler_1="Lanczos",
                              upscaling_crop=False)
    assert extras_upscale(image, uncropped)[0].size == uncropped.output_size(64, 32) == (200, 96)


def test_extras_keeps_transparency():
    image = noise_image(16, 16, "RGBA")
    out, _ = extras_upscale(image, ExtrasUpscale(upscaler_1="Nearest"))
    assert out.mode == "RGBA" and np.array_equal(pixels(out), pixels(image).repeat(2, 0).repeat(2, 1))


@pytest.mark.parametrize("changes, size, words", [
    ({"upscaler_1": "ESRGAN_4x"}, (64, 64), ["upscaler_1", "'Lanczos'"]),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 9.0}, (64, 64), ["upscaling_resize", "<= 8"]),
    ({"upscaler_1": "Lanczos", "resize_mode": 2}, (64, 64), ["resize_mode"]),
    ({"gfpgan_visibility": 0.5}, (64, 64), ["gfpgan_visibility", "face restoration"]),
    ({"codeformer_visibility": 1.0}, (64, 64), ["codeformer_visibility"]),
    ({"upscaler_1": "Lanczos", "extras_upscaler_2_visibility": 1.5}, (64, 64), ["extras_upscaler_2_visibility"]),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8.0}, (2000, 100), ["max_upscaled_side", "16000x800"]),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 9000}, (64, 64), ["upscaling_resize_w"]),
    ({"upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 4, "upscaling_resize_h": 4}, (64, 64),
     ["under 8 pixels"]),
])
def test_extras_checks_name_the_problem(changes, size, words):
    with pytest.raises(InvalidInputError) as caught:
        ExtrasUpscale(**changes).validate(Limits(), *size)
    assert all(word in str(caught.value) for word in words), str(caught.value)


@pytest.mark.parametrize("upscaler", ["Latent (bicubic antialiased)", "Nearest"])
def test_hires_fix_with_the_new_upscalers(upscaler):
    pipe = sdtorch.load()
    image = pipe("a red circle", steps=2, seed=3, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler,
                 hr_second_pass_steps=2)[0]
    assert image.size == (96, 96)
    assert f"Hires upscaler: {upscaler}" in read_infotext(image)
