"""Image and mask preparation: A1111 semantics, and diffusers' own preprocessing as the reference."""

import struct
import zlib
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from scipy.ndimage import gaussian_filter1d

from sdtorch import images
from sdtorch.errors import InvalidInputError
from sdtorch.images import (
    RESIZE_MODES,
    _gaussian_taps,
    blur_mask,
    check_size,
    crop_for_inpaint,
    crop_region,
    expand_to_aspect,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_latent,
    masked_image,
    paste_back,
    resize_image,
    tensor_to_images,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def stripes(colours, stripe_w, h, vertical=True):
    """Solid stripes side by side (vertical=True) or stacked (False)."""
    blocks = [np.full((h, stripe_w, 3), c, np.uint8) for c in colours]
    return PIL.Image.fromarray(np.concatenate(blocks, axis=1 if vertical else 0))


def near(pixel, colour, tol=12):
    return all(abs(int(p) - c) <= tol for p, c in zip(pixel, colour))


def random_image(rng, w, h):
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def random_mask(rng, w, h):
    """A blurred random blob mask with every grey level, plus the 127/128 threshold neighbours."""
    m = np.zeros((h, w), np.uint8)
    x1, y1 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    m[y1 : y1 + h // 3, x1 : x1 + w // 3] = 255
    m = np.asarray(blur_mask(PIL.Image.fromarray(m), 3)).copy()
    m[0, :4] = (127, 128, 1, 254)
    return PIL.Image.fromarray(m)


# ----------------------------------------------------------------------------- resize modes


def test_just_resize_stretches_non_square():
    out = resize_image(stripes([RED, BLUE], 20, 10), 16, 32, "just resize")  # 40x10 -> 16x32
    assert out.size == (16, 32) and out.mode == "RGB"
    px = np.asarray(out)
    assert near(px[16, 0], RED) and near(px[16, 15], BLUE)  # both halves survive, stretched
    assert near(px[0, 3], RED) and near(px[31, 12], BLUE)  # top and bottom rows too: nothing cropped


def test_crop_and_resize_keeps_only_the_centre():
    # 60x20 red|green|blue -> 20x20: scaled to cover (60x20, no scaling), centre 20 columns kept.
    out = resize_image(stripes([RED, GREEN, BLUE], 20, 20), 20, 20, "crop and resize")
    assert out.size == (20, 20)
    assert (np.asarray(out) == GREEN).all()
    # Tall 20x60 red/green/blue stacked -> 40x20: scaled to 40x120, rows 50..70 kept: all green.
    out = resize_image(stripes([RED, GREEN, BLUE], 20, 20, vertical=False), 40, 20, 1)
    px = np.asarray(out)
    assert out.size == (40, 20) and near(px[0, 0], GREEN) and near(px[19, 39], GREEN)


def test_resize_and_fill_keeps_everything_and_stretches_the_edges():
    # 60x20 red|green|blue -> 20x20: fitted to 20x6 (6 = 20*20//60) at y = 10 - 3 = 7; bands 0..6 and 13..19.
    out = resize_image(stripes([RED, GREEN, BLUE], 20, 20), 20, 20, "resize and fill")
    px = np.asarray(out)
    assert out.size == (20, 20)
    for y in (0, 3, 9, 16, 19):  # in the picture and in both filled bands: the columns keep their colour
        assert near(px[y, 1], RED) and near(px[y, 10], GREEN) and near(px[y, 18], BLUE), y
    # Tall 20x60 red/green/blue stacked -> 20x20: fitted to 6x20 at x = 7; side bands stretch the edge columns.
    px = np.asarray(resize_image(stripes([RED, GREEN, BLUE], 20, 20, vertical=False), 20, 20, 2))
    for x in (0, 5, 9, 15, 19):
        assert near(px[1, x], RED) and near(px[10, x], GREEN) and near(px[18, x], BLUE), x


@pytest.mark.parametrize("src", [(37, 23), (23, 37), (64, 64), (50, 10)])
def test_resize_modes_equal_diffusers_vae_image_processor(src):
    """diffusers' default/crop/fill resizes are A1111's modes 0/1/2 (same LANCZOS, same arithmetic)."""
    rng = np.random.default_rng(1)
    image, processor = random_image(rng, *src), VaeImageProcessor(vae_scale_factor=8)
    for width, height in [(32, 48), (48, 32), (40, 40), (64, 16)]:
        for mode, name in [(0, "default"), (1, "crop"), (2, "fill")]:
            ours = np.asarray(resize_image(image, width, height, mode))
            ref = np.asarray(processor.resize(image, height, width, resize_mode=name))
            assert ours.shape == (height, width, 3)
            np.testing.assert_array_equal(ours, ref, err_msg=f"{src} -> {width}x{height} mode {mode}")


def test_integer_modes_match_names_and_unknown_mode_lists_valid_ones():
    image = random_image(np.random.default_rng(2), 30, 18)
    for i, name in enumerate(RESIZE_MODES):
        assert np.array_equal(np.asarray(resize_image(image, 24, 24, i)), np.asarray(resize_image(image, 24, 24, name)))
    for bad in ("stretch", 3, -1, True, None):
        with pytest.raises(InvalidInputError) as err:
            resize_image(image, 24, 24, bad)
        assert all(name in str(err.value) for name in RESIZE_MODES)


# ----------------------------------------------------------------------------- masks


def test_gaussian_taps_are_opencvs_fixed_point_kernel():
    # OpenCV 4.12 getGaussianKernelFixedPoint_ED(getGaussianKernelBitExact(7, sigma=2), 8 bits).
    assert _gaussian_taps(7, 2.0).tolist() == [18, 34, 48, 56, 48, 34, 18]
    for sigma in (0.5, 1, 4, 8.5, 32):
        size = 2 * int(2.5 * sigma + 0.5) + 1  # A1111's kernel size
        taps = _gaussian_taps(size, sigma)
        assert taps.sum() == 256 and (taps == taps[::-1]).all()
        # Error diffusion: every running total of the outer taps is the exact one, rounded.
        exact = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma**2))
        exact = np.cumsum(exact / exact.sum() * 256)[: size // 2]
        assert np.abs(np.cumsum(taps[: size // 2]) - exact).max() <= 0.5 + 1e-9


def test_blur_hand_worked_step_edge():
    # sigma 0.5: size 3, outer weight e^-2 / (1 + 2 e^-2) * 256 = 27.26 -> taps [27, 202, 27].
    # A 0 | 255 step: left of the edge (27*255 + 128) >> 8 = 27, right (229*255 + 128) >> 8 = 228.
    step = np.zeros((3, 6), np.uint8)
    step[:, 3:] = 255
    out = np.asarray(blur_mask(PIL.Image.fromarray(step), (0.5, 0)))
    assert out[1].tolist() == [0, 0, 27, 228, 255, 255]
    out = np.asarray(blur_mask(PIL.Image.fromarray(step.T.copy()), (0, 0.5)))  # the y blur alone, on the transpose
    assert out[:, 1].tolist() == [0, 0, 27, 228, 255, 255]
    # Halves round up: a lone 128 gives 27 * 128 / 256 = 13.5 -> 14 beside it, 202 * 128 / 256 = 101 on it.
    dot = PIL.Image.fromarray(np.array([[0, 0, 128, 0, 0]], np.uint8))
    assert np.asarray(blur_mask(dot, (0.5, 0))).tolist() == [[0, 14, 101, 14, 0]]


def test_blur_is_a_gaussian_in_both_axes():
    """Against a float reference (scipy, same sigma, same truncation, reflect-101 'mirror' borders)."""
    rng = np.random.default_rng(3)
    pixels = (rng.random((40, 56)) > 0.7).astype(np.uint8) * 255
    for sigma in (2, 4, 9):
        ours = np.asarray(blur_mask(PIL.Image.fromarray(pixels), sigma)).astype(np.float64)
        ref = pixels.astype(np.float64)
        for axis in (1, 0):  # x then y, rounding between as A1111's two cv2 calls do
            ref = np.floor(gaussian_filter1d(ref, sigma, axis=axis, mode="mirror", truncate=2.5) + 0.5)
        # The only difference is OpenCV's 1/256-step kernel quantisation.
        assert np.abs(ours - ref).max() <= 2, sigma
    dot = np.zeros((31, 31), np.uint8)
    dot[15, 15] = 255
    out = np.asarray(blur_mask(PIL.Image.fromarray(dot), 3)).astype(int)
    assert (out == out.T).all() and out[15, 15] < 255 and out[15, 12] > 0 and out[12, 15] > 0


def test_load_mask_modes_invert_and_resize(tmp_path):
    m = np.zeros((10, 20), np.uint8)
    m[:, 10:] = 255
    m[0, 0] = 100
    assert np.array_equal(np.asarray(load_mask(PIL.Image.fromarray(m), 20, 10, blur=0)), m)
    assert np.array_equal(np.asarray(load_mask(PIL.Image.fromarray(m), 20, 10, blur=0, invert=True)), 255 - m)
    m[0, 0] = 0
    path = tmp_path / "mask.png"
    PIL.Image.fromarray(np.stack([m] * 3, -1)).save(path)  # RGB file: its luminance
    out = load_mask(path, 40, 20, blur=0)
    assert out.mode == "L" and out.size == (40, 20)
    px = np.asarray(out)
    assert (px[:, :14] == 0).all() and (px[:, 26:] == 255).all()
    # The blur happens at the mask's own resolution, then the resize (A1111's order).
    blurred = load_mask(PIL.Image.fromarray(m), 40, 20, blur=2)
    assert np.array_equal(np.asarray(blurred), np.asarray(resize_image(blur_mask(PIL.Image.fromarray(m), 2), 40, 20)))
    assert 0 < np.asarray(blurred)[10, 19] < 255


def test_load_mask_uses_alpha_of_a_painted_layer():
    rgba = np.zeros((8, 8, 4), np.uint8)  # black strokes: only the alpha says where
    rgba[2:6, 2:6, 3] = 255
    rgba[0, 0, 3] = 200  # > 128 -> repaint
    rgba[0, 1, 3] = 128  # not > 128 -> keep
    out = np.asarray(load_mask(PIL.Image.fromarray(rgba, "RGBA"), 8, 8, blur=0))
    expect = np.zeros((8, 8), np.uint8)
    expect[2:6, 2:6] = 255
    expect[0, 0] = 255
    assert np.array_equal(out, expect)
    # Fully opaque RGBA: alpha carries nothing, the colours are the mask (A1111 create_binary_mask).
    rgba[..., 3] = 255
    rgba[..., :3] = 255
    assert (np.asarray(load_mask(PIL.Image.fromarray(rgba, "RGBA"), 8, 8, blur=0)) == 255).all()
    # Alpha masks invert after binarising.
    la = PIL.Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.eye(4, dtype=np.uint8) * 255], -1), "LA")
    assert np.array_equal(np.asarray(load_mask(la, 4, 4, blur=0, invert=True)), 255 - np.eye(4, dtype=np.uint8) * 255)


# ----------------------------------------------------------------------------- only masked


def test_crop_region_hand_worked():
    m = np.zeros((10, 20), np.uint8)
    m[2:4, 5:9] = 7  # columns 5..8, rows 2..3
    mask = PIL.Image.fromarray(m)
    assert crop_region(mask, 0) == (5, 2, 9, 4)
    assert crop_region(mask, 3) == (2, 0, 12, 7)  # y1 clamped at 0: max(2 - 3, 0)
    assert crop_region(mask, 50) == (0, 0, 20, 10)
    assert crop_region(PIL.Image.new("L", (5, 5)), 4) is None  # nothing to inpaint


def test_expand_to_aspect_hand_worked():
    # 20x10 region, square target: height grows by 10, 5 each side.
    assert expand_to_aspect((10, 10, 30, 20), 64, 64, 100, 100) == (10, 5, 30, 25)
    # Same at the bottom edge: 40 wide -> 40 tall; (75, 115) slides up by 15 to (60, 100).
    assert expand_to_aspect((0, 90, 40, 100), 64, 64, 100, 100) == (0, 60, 40, 100)
    # 10x40 region, 2:1 target: width 80 wanted, +35 each side.
    assert expand_to_aspect((40, 0, 50, 40), 64, 32, 100, 100) == (5, 0, 85, 40)
    # 10x80 region, 2:1: 160 wanted -> (-75, 85) slides right to (0, 160), clipped to the 100-wide image.
    assert expand_to_aspect((0, 0, 10, 80), 64, 32, 100, 100) == (0, 0, 100, 80)
    # Odd shortfall: 21 wide, 10 tall, square: +11 rows, 5 above, 6 below.
    assert expand_to_aspect((0, 20, 21, 30), 8, 8, 50, 50) == (0, 15, 21, 36)


def test_crop_region_and_expand_equal_diffusers_get_crop_region():
    rng, processor = np.random.default_rng(4), VaeImageProcessor(vae_scale_factor=8)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(10, 70, 2))
        m = np.zeros((h, w), np.uint8)
        x1, x2 = sorted(rng.integers(0, w, 2))
        y1, y2 = sorted(rng.integers(0, h, 2))
        m[y1 : y2 + 1, x1 : x2 + 1] = rng.integers(1, 256)
        mask, pad = PIL.Image.fromarray(m), int(rng.integers(0, 9))
        tw, th = (int(v) for v in rng.choice([8, 16, 24, 40, 64], 2))
        ours = expand_to_aspect(crop_region(mask, pad), tw, th, w, h)
        assert ours == tuple(processor.get_crop_region(mask, tw, th, pad=pad))


def test_paste_back_only_masked():
    rng = np.random.default_rng(5)
    original = random_image(rng, 64, 48)
    raw = np.zeros((48, 64), np.uint8)
    raw[16:36, 12:30] = 255
    mask = blur_mask(PIL.Image.fromarray(raw), 2)
    region = expand_to_aspect(crop_region(mask, 4), 32, 32, 64, 48)
    assert crop_for_inpaint(original, region, 32, 32).size == (32, 32)
    generated = random_image(rng, 32, 32)
    out = paste_back(original, generated, region, mask)
    assert out.size == original.size and out.mode == "RGB"
    keep, repaint = np.asarray(mask) == 0, np.asarray(mask) == 255
    assert keep.any() and repaint.any()
    np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(original)[keep])
    x1, y1, x2, y2 = region
    placed = np.zeros((48, 64, 3), np.uint8)
    placed[y1:y2, x1:x2] = np.asarray(resize_image(generated, x2 - x1, y2 - y1, "crop and resize"))
    np.testing.assert_array_equal(np.asarray(out)[repaint], placed[repaint])
    # diffusers' padding_mask_crop overlay is the same operation.
    ref = VaeImageProcessor(vae_scale_factor=8).apply_overlay(mask, original, generated, region)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_paste_back_whole_picture_doubles_the_mask():
    rng = np.random.default_rng(6)
    original, generated = random_image(rng, 32, 24), random_image(rng, 32, 24)
    ramp = PIL.Image.fromarray(np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1)))
    out, m = np.asarray(paste_back(original, generated, None, ramp)), np.asarray(ramp)
    np.testing.assert_array_equal(out[m == 0], np.asarray(original)[m == 0])
    np.testing.assert_array_equal(out[m >= 128], np.asarray(generated)[m >= 128])  # 2 * 128 clips to 255
    with pytest.raises(InvalidInputError):
        paste_back(original, generated.resize((16, 16)), None, ramp)


# ----------------------------------------------------------------------------- inpainting UNet inputs vs diffusers


def test_mask_to_latent_and_masked_image_equal_diffusers_inpaint_preprocessing():
    rng = np.random.default_rng(7)
    # The inpaint pipeline's own processors (StableDiffusionInpaintPipeline.__init__).
    image_processor = VaeImageProcessor(vae_scale_factor=8)
    mask_processor = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )
    pipe = SimpleNamespace(vae_scale_factor=8)
    for width, height in [(64, 48), (40, 72), (32, 32)]:
        image, mask = random_image(rng, width, height), random_mask(rng, width, height)
        mask_condition = mask_processor.preprocess(mask, height=height, width=width)
        init_image = image_processor.preprocess(image, height=height, width=width).float()
        # prepare_mask_latents takes 4-channel masked images as latents already (no VAE call).
        ref_mask, _ = StableDiffusionInpaintPipeline.prepare_mask_latents(
            pipe, mask_condition, torch.zeros(1, 4, height // 8, width // 8), 1, height, width,
            torch.float32, "cpu", None, False,
        )
        ours = mask_to_latent(mask, height // 8, width // 8)
        assert ours.dtype == torch.float32 and ours.shape == (1, 1, height // 8, width // 8)
        assert torch.equal(ours, ref_mask)
        assert set(ours.unique().tolist()) <= {0.0, 1.0} and 0 < ours.sum() < ours.numel()
        assert torch.equal(masked_image(image, mask), init_image * (mask_condition < 0.5))
    with pytest.raises(InvalidInputError):
        masked_image(image, mask.resize((8, 8)))


def test_pixel_tensors_equal_diffusers_pre_and_postprocess():
    rng = np.random.default_rng(8)
    processor, image = VaeImageProcessor(vae_scale_factor=8), random_image(rng, 24, 16)
    assert torch.equal(image_to_tensor(image), processor.preprocess(image))
    for dtype in (torch.float32, torch.float16):
        x = (torch.randn(2, 3, 16, 24) * 0.8).to(dtype)
        ours, ref = tensor_to_images(x), processor.postprocess(x, output_type="pil")
        assert len(ours) == 2 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, ref))


# ----------------------------------------------------------------------------- loading and sizes


def test_load_image_applies_exif_orientation_and_flattens_alpha(tmp_path):
    pixels = np.zeros((2, 4, 3), np.uint8)  # 4 wide, 2 tall; red top-left corner
    pixels[0, 0] = RED
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.png"
    PIL.Image.fromarray(pixels).save(path, exif=exif)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (2, 4)
    assert tuple(np.asarray(out)[0, 1]) == RED  # top-left went to top-right
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)
    out = np.asarray(load_image(PIL.Image.fromarray(rgba, "RGBA")))
    assert tuple(out[0, 0]) == BLUE and tuple(out[1, 1]) == (255, 255, 255)  # transparent -> white
    assert load_image(path.read_bytes()).size == (2, 4)


def test_unreadable_images_raise_clear_errors(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    good = tmp_path / "good.png"
    PIL.Image.new("RGB", (64, 64), RED).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    for path, why in [
        (text, "not an image"),
        (tmp_path / "missing.png", "no such file"),
        (tmp_path, "directory"),
        (truncated, ""),
    ]:
        for loader in (load_image, lambda p: load_mask(p, 8, 8)):
            with pytest.raises(InvalidInputError) as err:
                loader(path)
            assert str(path) in str(err.value) and why in str(err.value)


def test_check_size():
    check_size(512, 768)
    check_size(8, 8)
    for w, h in [(500, 512), (512, 0), (-8, 8), (8.0, 8), (True, 8)]:
        with pytest.raises(InvalidInputError, match="multiples of 8"):
            check_size(w, h)


# ----------------------------------------------------------------------------- deep, odd and hostile images

GRADIENT = np.linspace(0, 65535, 32 * 64).round().astype(np.uint16).reshape(32, 64)  # every 32nd level, both ends
GRADIENT_8 = np.rint(GRADIENT / 257).astype(np.uint8)  # the 8-bit equivalent: 65535 -> 255, rounded


def png_bytes(samples, colour_type, bit_depth=16, trns=None, size=None):
    """A PNG written by hand (Pillow cannot write 16-bit colour): samples (H, W[, C]) of the file's depth.

    `size` (width, height) makes the header claim another size than the samples have.
    """
    samples = np.asarray(samples)
    width, height = size or (samples.shape[1], samples.shape[0])
    if bit_depth < 8:  # pack each row's samples into bytes, most significant first
        bits = np.unpackbits(samples.astype(np.uint8)[..., None], axis=-1)[..., 8 - bit_depth :]
        rows = [np.packbits(row.reshape(-1)).tobytes() for row in bits]
    else:
        rows = [row.astype(">u2" if bit_depth == 16 else np.uint8).tobytes() for row in samples]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    extra = chunk(b"tRNS", struct.pack(f">{len(trns)}H", *trns)) if trns else b""
    data = zlib.compress(b"".join(b"\0" + row for row in rows))  # filter type 0 on every row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + extra + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def saved(image, path):
    image.save(path)
    return path


def gradient_as(mode, dtype):
    return PIL.Image.frombytes(mode, (64, 32), GRADIENT.astype(dtype).tobytes())


def pgm_16_bit(path):
    path.write_bytes(b"P5\n64 32\n65535\n" + GRADIENT.astype(">u2").tobytes())
    return path


DEEP_GREY_SOURCES = {  # name: (build it in a folder, the mode Pillow gives on reading it)
    "I;16 PNG": (lambda d: saved(PIL.Image.fromarray(GRADIENT), d / "g.png"), "I;16"),
    "I;16B TIFF": (lambda d: saved(gradient_as("I;16B", ">u2"), d / "g.tif"), "I;16B"),
    "I;16L in memory": (lambda d: gradient_as("I;16L", "<u2"), "I;16L"),
    "I;16N in memory": (lambda d: gradient_as("I;16N", "=u2"), "I;16N"),
    "I TIFF": (lambda d: saved(PIL.Image.fromarray(GRADIENT.astype(np.int32)), d / "g.tif"), "I"),
    "I 16-bit PGM": (lambda d: pgm_16_bit(d / "g.pgm"), "I"),  # Pillow reads maxval > 255 as "I"
    "F 0..1 TIFF": (lambda d: saved(PIL.Image.fromarray((GRADIENT / 65535).astype(np.float32)), d / "g.tif"), "F"),
    "F 0..255 TIFF": (lambda d: saved(PIL.Image.fromarray((GRADIENT / 257).astype(np.float32)), d / "g.tif"), "F"),
    "F 0..65535 TIFF": (lambda d: saved(PIL.Image.fromarray(GRADIENT.astype(np.float32)), d / "g.tif"), "F"),
}


@pytest.mark.parametrize("name", DEEP_GREY_SOURCES)
def test_deep_greyscale_reads_as_its_8_bit_equivalent(tmp_path, name):
    """Pillow's convert("L") clips at 255 (a white picture); each deep mode is scaled to 8 bits instead."""
    build, mode = DEEP_GREY_SOURCES[name]
    source = build(tmp_path)
    assert (source if isinstance(source, PIL.Image.Image) else PIL.Image.open(source)).mode == mode
    out = np.asarray(load_image(source)).astype(int)  # (32, 64, 3)
    assert out.shape == (32, 64, 3) and (out == out[..., :1]).all()
    assert np.abs(out[..., 0] - GRADIENT_8).max() <= 1, name
    for blur in (0, 4):
        ours = np.asarray(load_mask(source, 48, 24, blur=blur)).astype(int)
        ref = np.asarray(load_mask(PIL.Image.fromarray(GRADIENT_8), 48, 24, blur=blur)).astype(int)
        assert np.abs(ours - ref).max() <= 1, (name, blur)


def test_16_bit_mask_equals_the_8_bit_mask(tmp_path):
    """Thresholds and blur act on the same 8-bit values: the masks are identical, not just close."""
    mask16 = GRADIENT.copy()
    mask16[:, :20] = 0
    mask16[:, 40:] = 65535
    mask16[5, 30:34] = (32767, 32896, 32897, 33153)  # around 127.5 and 128.5 of 255
    path = saved(PIL.Image.fromarray(mask16), tmp_path / "mask16.png")
    mask8 = PIL.Image.fromarray(np.rint(mask16 / 257).astype(np.uint8))
    for options in ({"blur": 0}, {"blur": 4}, {"blur": 3, "invert": True}, {"blur": 2, "resize_mode": 1}):
        ours, ref = load_mask(path, 40, 40, **options), load_mask(mask8, 40, 40, **options)
        assert np.array_equal(np.asarray(ours), np.asarray(ref)), options
    # With a 16-bit colour key the key pixels are transparent: the alpha is the mask, as for 8-bit alpha.
    keyed = png_bytes(mask16, colour_type=0, trns=[65535])
    assert np.array_equal(np.asarray(load_mask(keyed, 64, 32, blur=0)), np.where(mask16 == 65535, 0, 255))


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (6, 4), (4, 2)])  # RGB, RGBA, grey + alpha
def test_16_bit_colour_pngs_read_as_8_bit(colour_type, channels):
    """Pillow decodes 16-bit colour PNGs to 8 bits itself (the top byte: within 1 of rounding)."""
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 65536, (6, 7, channels), dtype=np.uint16)
    samples[0, 0], samples[0, 1] = 65535, 0  # opaque white; black, or transparent where there is alpha
    ours = np.asarray(load_image(png_bytes(samples, colour_type))).astype(int)
    ref = np.asarray(load_image(png_bytes(np.rint(samples / 257), colour_type, bit_depth=8))).astype(int)
    tolerance = 1 if channels == 3 else 2  # blending two values each within 1 onto white
    assert ours.shape == (6, 7, 3) and np.abs(ours - ref).max() <= tolerance
    assert ours[0, 0].tolist() == [255] * 3 and ours[0, 1].tolist() == [0 if channels == 3 else 255] * 3


def test_png_colour_keys_of_other_depths():
    """Pillow leaves tRNS keys in the file's depth: 16-bit grey, 16-bit RGB and 2-bit grey keys still key."""
    grey16 = np.array([[0, 1000, 65535, 65280]], np.uint16)  # 65280 has the key's top byte, not its value
    out = np.asarray(load_image(png_bytes(grey16, 0, trns=[1000])))
    assert out[0, :, 0].tolist() == [0, 255, 255, 254]  # 1000 is transparent -> white; 65280 -> 254
    rgb16 = np.array([[[65535, 0, 32768], [0, 0, 0], [65535, 0, 32768]]], np.uint16)
    out = np.asarray(load_image(png_bytes(rgb16, 2, trns=[65535, 0, 32768])))
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0], [255, 255, 255]]
    grey2 = np.array([[0, 1, 2, 3]], np.uint8)
    out = np.asarray(load_image(png_bytes(grey2, 0, bit_depth=2, trns=[0])))
    assert out[0, :, 0].tolist() == [255, 85, 170, 255]  # value 0 is the key: white, not black


COLOURS = [RED, GREEN, BLUE, (255, 255, 255), (0, 0, 0), (200, 120, 40)]


@pytest.mark.parametrize("mode, fmt, tolerance", [
    ("RGB", "PNG", 0), ("CMYK", "TIFF", 0), ("CMYK", "JPEG", 40), ("YCbCr", "TIFF", 2), ("YCbCr", None, 2),
    ("LAB", "TIFF", 24), ("HSV", None, 2), ("P", "PNG", 0), ("P", "GIF", 0), ("RGBA", "PNG", 0),
])  # 8-bit Lab holds saturated blue coarsely; Pillow's Lab -> RGB is littleCMS's (channels copied would be > 100 off)
def test_colour_modes_read_as_rgb(tmp_path, mode, fmt, tolerance):
    picture = PIL.Image.fromarray(np.array([COLOURS], np.uint8)).resize((12, 8), PIL.Image.Resampling.NEAREST)
    image = picture.convert(mode, palette=PIL.Image.Palette.ADAPTIVE)  # (8, 12): 2-pixel-wide stripes
    source = saved(image, tmp_path / f"picture.{fmt.lower()}") if fmt else image
    out = np.asarray(load_image(source)).astype(int)
    assert out.shape == (8, 12, 3) and np.abs(out - np.asarray(picture)).max() <= tolerance, (mode, fmt)


def test_grey_alpha_and_palette_modes_read_as_rgb(tmp_path):
    def rgb(source):
        return np.asarray(load_image(source))[0].tolist()

    assert rgb(PIL.Image.fromarray(np.array([[0, 255, 0]], bool))) == [[0] * 3, [255] * 3, [0] * 3]  # "1"
    assert rgb(saved(PIL.Image.fromarray(np.array([[0, 100, 255]], np.uint8)), tmp_path / "l.png")) == [
        [0] * 3, [100] * 3, [255] * 3]
    la = np.array([[[100, 255], [100, 0], [100, 128]]], np.uint8)  # alpha 255, 0, 128 -> over white
    blended = round(100 * 128 / 255 + 255 * 127 / 255)
    for source in (PIL.Image.fromarray(la), saved(PIL.Image.fromarray(la), tmp_path / "la.png")):
        out = rgb(source)
        assert out[:2] == [[100] * 3, [255] * 3] and abs(out[2][0] - blended) <= 1
    premultiplied = PIL.Image.frombytes("La", (3, 1), bytes([100, 255, 0, 0, 50, 128]))  # no file holds La
    out = np.asarray(load_image(premultiplied)).astype(int) - np.asarray(load_image(PIL.Image.fromarray(la)))
    assert np.abs(out).max() <= 1
    palette = PIL.Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    palette.putdata([0, 1, 2])
    assert rgb(palette) == [list(RED), list(BLUE), list(GREEN)]
    palette.info["transparency"] = 1  # index 1 transparent, in memory and through PNG and GIF
    for source in (palette, saved(palette, tmp_path / "p.png"), saved(palette, tmp_path / "p.gif")):
        assert rgb(source) == [list(RED), [255] * 3, list(GREEN)]
    pa = PIL.Image.merge("PA", (palette.copy(), PIL.Image.frombytes("L", (3, 1), bytes([255, 255, 0]))))
    assert rgb(pa) == [list(RED), list(BLUE), [255] * 3]


def test_float_and_int_images_of_unknown_range_are_refused(tmp_path):
    for values in ([0.0, np.nan], [-0.5, 1.0], [0.0, np.inf], [0.0, 70000.0]):
        path = saved(PIL.Image.fromarray(np.array([values], np.float32)), tmp_path / "f.tif")
        for loader in (load_image, lambda p: load_mask(p, 8, 8)):
            with pytest.raises(InvalidInputError, match="no known range") as err:
                loader(path)
            assert str(path) in str(err.value)
    with pytest.raises(InvalidInputError, match="no known range"):
        load_image(PIL.Image.fromarray(np.array([[-1, 5]], np.int32)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns from 89 megapixels
def test_empty_and_huge_images_are_refused(tmp_path, monkeypatch):
    for size in [(0, 0), (0, 5), (5, 0)]:
        for loader in (load_image, lambda p: load_mask(p, 8, 8)):
            with pytest.raises(InvalidInputError, match="empty"):
                loader(PIL.Image.new("RGB", size))
    empty = tmp_path / "empty.png"
    empty.write_bytes(png_bytes(np.zeros((0, 4), np.uint8), 0, bit_depth=8))  # Pillow will not open it
    with pytest.raises(InvalidInputError, match="empty.png"):
        load_image(empty)
    # Headers claiming more pixels than allowed (one pixel of data): refused from the header, nothing decoded.
    for (width, height), why in [((12000, 12000), "144,000,000 pixels, more than the 134,217,728 allowed"),
                                 ((20000, 10000), "decompression bomb")]:  # Pillow's own, higher limit
        bomb = tmp_path / f"bomb{width}.png"
        bomb.write_bytes(png_bytes(np.zeros((1, 1), np.uint8), 0, bit_depth=8, size=(width, height)))
        with pytest.raises(InvalidInputError, match=why) as err:
            load_image(bomb)
        assert str(bomb) in str(err.value)
    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # files and PIL images alike
    big = saved(PIL.Image.new("RGB", (11, 10)), tmp_path / "big.png")
    for source in (big, PIL.Image.new("RGB", (11, 10))):
        for loader in (load_image, lambda p: load_mask(p, 8, 8)):
            with pytest.raises(InvalidInputError, match="110 pixels, more than the 100 allowed"):
                loader(source)
    assert load_image(PIL.Image.new("RGB", (10, 10))).size == (10, 10)


def test_animated_images_give_their_first_frame(tmp_path):
    frames = [PIL.Image.new("RGB", (4, 4), colour) for colour in (RED, BLUE)]
    for name in ("anim.gif", "anim.png", "anim.webp"):
        path = tmp_path / name
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)
        assert PIL.Image.open(path).n_frames == 2
        assert near(np.asarray(load_image(path))[2, 2], RED, tol=2), name
        assert (np.asarray(load_mask(path, 4, 4, blur=0)) == 76).all(), name  # red's luminance
