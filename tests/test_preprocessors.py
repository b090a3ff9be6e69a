"""ControlNet preprocessors against computations written here from the A1111 extension's arithmetic
(scripts/utils.py resize_image_with_pad, scripts/preprocessor/*.py, annotator/*), numpy or scipy where they can
stand in for OpenCV, and against facts read from the extension's source (names, labels, slider specs)."""

import math

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from sdtorch.errors import InvalidInputError
from sdtorch.preprocessors import (PREPROCESSORS, control_pixels, get_preprocessor, module_list, numpy_seed,
                                   pixel_perfect_resolution, preprocess, resize_with_pad)


def scene(height=100, width=150, seed=0):
    """A test picture: smooth colour gradients, a dark rectangle, a bright disc and some noise (RGB uint8)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60], axis=2)
    img[height // 4: height // 2, width // 5: width // 2] = (20, 30, 40)
    img[(y - 0.6 * height) ** 2 + (x - 0.7 * width) ** 2 < (0.2 * height) ** 2] = (240, 230, 200)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def reference_resize(img, res):
    """The extension's resize_image_with_pad, written out: shorter side to res, edge padding to 64."""
    h0, w0 = img.shape[:2]
    k = res / min(h0, w0)
    h, w = int(round(h0 * k)), int(round(w0 * k))
    out = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    H, W = math.ceil(h / 64) * 64, math.ceil(w / 64) * 64
    return np.pad(out, ((0, H - h), (0, W - w), (0, 0)), mode="edge"), h, w


def rgb(hint):
    assert hint.mode == "RGB"
    return np.asarray(hint)


IMG = scene()
PIL_IMG = Image.fromarray(IMG)


# ----------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("size, res, expected", [
    ((150, 100), 512, (768, 512)),  # k = 5.12: 150 * 5.12 = 768
    ((333, 200), 512, (852, 512)),  # 852.48 rounds down
    ((100, 150), 128, (128, 192)),
    ((150, 100), 64, (96, 64)),     # downscaling
])
def test_edge_hints_come_out_at_the_resolution_on_the_shorter_side(size, res, expected):
    image = Image.fromarray(scene(size[1], size[0]))
    for name in ("canny", "threshold", "scribble_xdog", "lineart_standard", "blur_gaussian", "shuffle"):
        assert preprocess(name, image, resolution=res).size == expected, name


def test_resize_with_pad_scales_then_pads_with_the_edge_to_multiples_of_64():
    padded, (h, w) = resize_with_pad(IMG, 100)
    assert (h, w) == (100, 150) and padded.shape == (128, 192, 3)
    assert np.array_equal(padded[:h, :w], cv2.resize(IMG, (150, 100), interpolation=cv2.INTER_AREA))
    assert np.array_equal(padded[h:, :w], np.broadcast_to(padded[h - 1, :w], (128 - h, w, 3)))
    assert np.array_equal(padded[:, w:], np.broadcast_to(padded[:, w - 1:w], (128, 192 - w, 3)))


def test_images_at_the_size_already_are_not_resampled():
    img = scene(128, 192)
    padded, (h, w) = resize_with_pad(img, 128)
    assert (h, w) == (128, 192) and np.array_equal(padded, img)


# ----------------------------------------------------------------------------- each weight-free preprocessor


@pytest.mark.parametrize("low, high", [(100, 200), (20, 60), (1, 255)])
def test_canny_is_cv2_canny_of_the_padded_resized_image_cropped(low, high):
    padded, h, w = reference_resize(IMG, 160)
    edges = cv2.Canny(padded, low, high)[:h, :w]
    hint = rgb(preprocess("canny", PIL_IMG, resolution=160, threshold_a=low, threshold_b=high))
    assert np.array_equal(hint, np.stack([edges] * 3, axis=2))
    assert set(np.unique(hint)) <= {0, 255} and hint.max() == 255


def test_canny_defaults_are_100_and_200():
    assert np.array_equal(preprocess("canny", PIL_IMG, 128), preprocess("canny", PIL_IMG, 128, 100, 200))
    assert np.array_equal(preprocess("canny", PIL_IMG, 128, -1, -1), preprocess("canny", PIL_IMG, 128, 100, 200))
    assert not np.array_equal(preprocess("canny", PIL_IMG, 128), preprocess("canny", PIL_IMG, 128, 10, 30))


@pytest.mark.parametrize("t", [127, 60, 200.5])
def test_threshold_is_white_where_every_channel_exceeds_it(t):
    img = scene(128, 192)  # no resampling at 128: plain numpy on the pixels
    expected = np.where((img > t).all(axis=2), 255, 0)
    assert np.array_equal(rgb(preprocess("threshold", Image.fromarray(img), 128, t)), np.stack([expected] * 3, 2))


def test_threshold_resized():
    padded, h, w = reference_resize(IMG, 200)
    expected = np.where(padded.min(axis=2) > 127, 255, 0)[:h, :w]
    assert np.array_equal(rgb(preprocess("threshold", PIL_IMG, 200))[:, :, 1], expected)


def test_invert_is_255_minus_the_image_at_its_own_size():
    assert np.array_equal(rgb(preprocess("invert", PIL_IMG, resolution=1024)), 255 - IMG)
    assert get_preprocessor("invert (from white bg & black line)").name == "invert"


def test_none_is_the_image():
    assert np.array_equal(rgb(preprocess("none", PIL_IMG)), IMG)


@pytest.mark.parametrize("t", [32, 4, 60.5])
def test_scribble_xdog_thresholds_a_difference_of_gaussians(t):
    padded, h, w = reference_resize(IMG, 128)
    x = padded.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2))
    dog = dog.clip(0, 255).astype(np.uint8)
    expected = np.where(2 * (255 - dog.astype(np.int32)) > t, 255, 0)[:h, :w]
    assert np.array_equal(rgb(preprocess("scribble_xdog", PIL_IMG, 128, t))[:, :, 0], expected)


def test_scribble_xdog_agrees_with_scipy_gaussians():
    img = scene(128, 192)  # no resampling: OpenCV's Gaussian (reflect-101 borders, 4-sigma radius) vs scipy's
    x = img.astype(np.float64)
    g1 = ndimage.gaussian_filter(x, (0.5, 0.5, 0), mode="mirror", truncate=4.0)
    g2 = ndimage.gaussian_filter(x, (5.0, 5.0, 0), mode="mirror", truncate=4.0)
    strength = 2 * (255 - (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8).astype(np.int32))
    hint = rgb(preprocess("scribble_xdog", Image.fromarray(img), 128, 32))[:, :, 0]
    assert np.mean(hint == np.where(strength > 32, 255, 0)) > 0.995
    assert 0.005 < np.mean(hint == 255) < 0.5  # lines, not a blank or a flood


def test_lineart_standard_arithmetic():
    padded, h, w = reference_resize(IMG, 128)
    x = padded.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    intensity = intensity / max(16, np.median(intensity[intensity > 8])) * 127
    expected = intensity.clip(0, 255).astype(np.uint8)[:h, :w]
    assert np.abs(rgb(preprocess("lineart_standard", PIL_IMG, 128))[:, :, 0].astype(int) - expected).max() <= 1


def test_lineart_standard_turns_black_lines_on_white_into_lines_at_127_on_black():
    img = np.full((128, 128, 3), 255, np.uint8)
    img[60:63, 10:118] = 0  # a black line
    hint = rgb(preprocess("lineart_standard", Image.fromarray(img), 128))[:, :, 0]
    assert 100 < hint[61, 20:100].min() and hint[61, 20:100].max() <= 127  # the median line strength -> 127
    assert hint[:40].max() == 0 and hint[90:].max() == 0
    flat = rgb(preprocess("lineart_standard", Image.new("RGB", (128, 128), "white"), 128))
    assert flat.max() == 0  # nothing above 8: divided by 16, no NaN


def test_blur_gaussian_blurs_the_cropped_resized_image():
    padded, h, w = reference_resize(IMG, 128)
    expected = cv2.GaussianBlur(np.ascontiguousarray(padded[:h, :w]), (0, 0), 3.0)
    hint = rgb(preprocess("blur_gaussian", PIL_IMG, 128, 3.0))
    assert np.array_equal(hint, expected)
    scipy_blur = ndimage.gaussian_filter(padded[:h, :w].astype(np.float64), (3, 3, 0), mode="mirror", truncate=3.0)
    assert np.abs(hint - scipy_blur).max() <= 1.5  # OpenCV's 8-bit fixed point
    assert np.array_equal(preprocess("blur_gaussian", PIL_IMG, 128), preprocess("blur_gaussian", PIL_IMG, 128, 9.0))


def test_tile_resample_divides_the_size_by_the_rate_with_area_averaging():
    img = scene(96, 128)
    assert np.array_equal(rgb(preprocess("tile_resample", Image.fromarray(img), threshold_a=1.0)), img)
    assert np.array_equal(rgb(preprocess("tile_resample", Image.fromarray(img), threshold_a=1.09)), img)
    half = rgb(preprocess("tile_resample", Image.fromarray(img), threshold_a=2.0))
    block_mean = img.reshape(48, 2, 64, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert half.shape == (48, 64, 3) and np.abs(half - block_mean).max() <= 0.5 + 1e-9
    assert preprocess("tile_resample", Image.fromarray(img), threshold_a=3.0).size == (42, 32)  # int(128/3), 96/3


def extension_noise_disk(h, w, f):
    """annotator/util.py make_noise_disk with C=1, drawn from numpy's global generator as the extension does."""
    noise = np.random.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


def test_shuffle_is_the_extensions_content_shuffle_for_the_same_numpy_seed():
    padded, h, w = reference_resize(IMG, 128)
    img = np.ascontiguousarray(padded[:h, :w])
    state = np.random.get_state()
    try:
        np.random.seed(1234)
        x = extension_noise_disk(h, w, 256) * float(w - 1)
        y = extension_noise_disk(h, w, 256) * float(h - 1)
    finally:
        np.random.set_state(state)
    expected = cv2.remap(img, np.concatenate([x, y], axis=2).astype(np.float32), None, cv2.INTER_LINEAR)
    hint = rgb(preprocess("shuffle", PIL_IMG, 128, seed=1234))
    assert np.array_equal(hint, expected)
    assert not np.array_equal(hint, rgb(preprocess("shuffle", PIL_IMG, 128, seed=1235)))
    assert not np.array_equal(hint, img)


def test_shuffle_only_moves_colours():
    flat = Image.new("RGB", (96, 64), (12, 200, 99))
    assert (rgb(preprocess("shuffle", flat, 64, seed=3)) == (12, 200, 99)).all()


def test_recolor_intensity_is_the_gamma_corrected_maximum_channel():
    for gamma in (1.0, 0.5, 1.7):
        v = IMG.max(axis=2).astype(np.float64) / 255
        expected = (v ** gamma * 255).clip(0, 255)
        hint = rgb(preprocess("recolor_intensity", PIL_IMG, threshold_a=gamma))
        assert hint.shape == IMG.shape and np.abs(hint[:, :, 0] - expected).max() <= 1


def cie_lightness_8bit(r, g, b):
    """CIE L* of an sRGB colour, scaled to 0..255 as OpenCV's 8-bit Lab stores it."""
    lin = [(c / 255 / 12.92) if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    y = 0.212671 * lin[0] + 0.715160 * lin[1] + 0.072169 * lin[2]
    lightness = 116 * y ** (1 / 3) - 16 if y > 0.008856 else 903.3 * y
    return lightness * 255 / 100


def test_recolor_luminance_is_lab_lightness_with_the_extensions_channel_order():
    for grey in (0, 40, 128, 200, 255):
        hint = rgb(preprocess("recolor_luminance", Image.new("RGB", (8, 8), (grey,) * 3)))
        assert abs(int(hint[0, 0, 0]) - cie_lightness_8bit(grey, grey, grey)) <= 1.5
    # The extension converts its RGB array with COLOR_BGR2LAB: pure red is measured as pure blue and back
    red = rgb(preprocess("recolor_luminance", Image.new("RGB", (8, 8), (255, 0, 0))))[0, 0, 0]
    blue = rgb(preprocess("recolor_luminance", Image.new("RGB", (8, 8), (0, 0, 255))))[0, 0, 0]
    assert abs(red - cie_lightness_8bit(0, 0, 255)) <= 1.5 and abs(blue - cie_lightness_8bit(255, 0, 0)) <= 1.5
    half = rgb(preprocess("recolor_luminance", Image.new("RGB", (8, 8), (128,) * 3), threshold_a=0.5))[0, 0, 0]
    assert abs(half - math.sqrt(cie_lightness_8bit(128, 128, 128) / 255) * 255) <= 1.5


def test_color_grid_keeps_64px_cells_of_one_colour():
    cells = np.random.default_rng(1).integers(0, 256, (2, 3, 3)).astype(np.uint8)
    img = np.kron(cells, np.ones((64, 64, 1), np.uint8))  # (128, 192, 3): 64x64 blocks
    assert np.array_equal(rgb(preprocess("t2ia_color_grid", Image.fromarray(img), 128)), img)
    assert get_preprocessor("t2ia_color_grid").name == "color"


def test_inpaint_hints_carry_the_mask_and_the_controlnet_sees_minus_one_there():
    mask = np.zeros(IMG.shape[:2], np.uint8)
    mask[20:50, 30:90] = 255
    mask[60, 60] = 128  # above half: masked
    mask[61, 61] = 127  # below: kept
    for name in ("inpaint_only", "inpaint", "inpaint_global_harmonious"):
        hint = preprocess(name, PIL_IMG, mask=Image.fromarray(mask))
        assert hint.mode == "RGBA" and np.array_equal(np.asarray(hint)[:, :, :3], IMG)
        assert np.array_equal(np.asarray(hint)[:, :, 3], mask)
    pixels = control_pixels(hint)
    masked = mask > 127
    assert pixels.shape == IMG.shape and pixels.dtype == np.float32
    assert (pixels[masked] == -1).all()
    assert np.allclose(pixels[~masked], IMG[~masked] / 255.0)
    assert np.allclose(control_pixels(PIL_IMG), IMG / 255.0)


def test_inpaint_needs_a_mask_of_the_same_size():
    with pytest.raises(InvalidInputError, match="needs a mask"):
        preprocess("inpaint_only", PIL_IMG)
    with pytest.raises(InvalidInputError, match="same size"):
        preprocess("inpaint_only", PIL_IMG, mask=Image.new("L", (10, 10)))


def test_transparent_and_grey_inputs_are_read_as_the_extension_reads_them():
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:32, :, 3] = 255  # top opaque, bottom transparent (-> white)
    rgba[32:40, :, 3] = 100  # partly: color * a + 255 * (1 - a), truncated
    hint = rgb(preprocess("none", Image.fromarray(rgba)))
    assert (hint[:32] == (10, 20, 30)).all() and (hint[40:] == 255).all()
    a = 100 / 255
    assert (hint[32:40] == np.array([int(c * a + 255 * (1 - a)) for c in (10, 20, 30)])).all()
    grey = scene(64, 96)[:, :, 0]
    assert np.array_equal(rgb(preprocess("invert", Image.fromarray(grey))), np.stack([255 - grey] * 3, axis=2))


# ----------------------------------------------------------------------------- parameters and names


@pytest.mark.parametrize("name, kwargs", [
    ("canny", dict(threshold_a=0)), ("canny", dict(threshold_a=256)), ("canny", dict(threshold_b=300)),
    ("canny", dict(threshold_a=float("nan"))), ("canny", dict(threshold_a="100")), ("canny", dict(threshold_a=True)),
    ("canny", dict(resolution=63)), ("canny", dict(resolution=2049)), ("canny", dict(resolution=100.5)),
    ("threshold", dict(threshold_a=-2)), ("threshold", dict(threshold_a=255.5)),
    ("scribble_xdog", dict(threshold_a=0.5)), ("scribble_xdog", dict(threshold_a=65)),
    ("tile_resample", dict(threshold_a=0.5)), ("tile_resample", dict(threshold_a=8.5)),
    ("blur_gaussian", dict(threshold_a=0)), ("blur_gaussian", dict(threshold_a=65)),
    ("recolor_luminance", dict(threshold_a=0.05)), ("shuffle", dict(resolution=32)),
])
def test_values_outside_a_sliders_range_are_refused(name, kwargs):
    with pytest.raises(InvalidInputError):
        preprocess(name, PIL_IMG, **kwargs)


def test_range_ends_and_unused_sliders_are_accepted():
    preprocess("canny", PIL_IMG, resolution=64, threshold_a=1, threshold_b=255)
    preprocess("threshold", PIL_IMG, resolution=64, threshold_a=0, threshold_b=1e9)  # no second slider: ignored
    preprocess("invert", PIL_IMG, resolution=1, threshold_a=-5)  # no sliders at all


def test_names_labels_old_names_and_case_find_the_same_module():
    assert get_preprocessor("depth").name == get_preprocessor("depth_midas").name == "depth"
    assert get_preprocessor("lineart_realistic").name == "lineart"
    assert get_preprocessor("te_hed").name == "softedge_teed"
    assert get_preprocessor("Canny").name == "canny"
    assert get_preprocessor("lineart_standard (from white bg & black line)").name == "lineart_standard"


def test_unknown_names_suggest_the_closest():
    with pytest.raises(InvalidInputError, match="did you mean 'canny'"):
        preprocess("cany", PIL_IMG)
    with pytest.raises(InvalidInputError, match="unknown ControlNet preprocessor"):
        preprocess("no such thing at all", PIL_IMG)


@pytest.mark.parametrize("name, file", [
    ("depth_midas", "dpt_hybrid-midas-501f0c75.pt"), ("openpose", "body_pose_model.pth"),
    ("lineart_realistic", "sk_model.pth"), ("softedge_hed", "ControlNetHED.pth"),
    ("mlsd", "mlsd_large_512_fp32.pth"), ("depth_zoe", "ZoeD_M12_N.pt"),
])
def test_model_based_modules_say_which_weights_they_need(name, file):
    assert get_preprocessor(name).needs_weights
    with pytest.raises(InvalidInputError, match="weights=") as info:
        preprocess(name, PIL_IMG)
    assert file in str(info.value)


def test_given_weights_are_checked(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        preprocess("depth_midas", PIL_IMG, weights=tmp_path / "missing.pt")
    with pytest.raises(InvalidInputError, match="lacks hand_pose_model.pth, facenet.pth"):
        (tmp_path / "body_pose_model.pth").write_bytes(b"x")
        preprocess("openpose", PIL_IMG, weights=tmp_path)
    (tmp_path / "dpt_hybrid-midas-501f0c75.pt").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="does not run its network"):
        preprocess("depth_midas", PIL_IMG, weights=tmp_path)


def test_weight_free_modules_need_no_weights():
    free = {"none", "canny", "invert", "threshold", "scribble_xdog", "tile_resample", "shuffle", "inpaint",
            "inpaint_only", "blur_gaussian", "lineart_standard", "recolor_luminance", "recolor_intensity", "color"}
    assert {p.name for p in PREPROCESSORS.values() if not p.needs_weights} == free
    assert all(p.run is not None for p in PREPROCESSORS.values() if not p.needs_weights)


# ----------------------------------------------------------------------------- the extension's module list


def test_module_list_answers_as_the_extension():
    answer = module_list()
    names = answer["module_list"]
    assert names[0] == "none" and len(names) == len(set(names)) == len(PREPROCESSORS)
    assert {"canny", "invert", "threshold", "scribble_xdog", "tile_resample", "shuffle", "inpaint_only",
            "blur_gaussian", "lineart_standard", "depth", "openpose", "lineart", "hed"} <= set(names)
    # priority 100 before 20 (invert) before 0, each by label descending
    assert names.index("canny") < names.index("invert") < names.index("threshold") < names.index("blur_gaussian")
    assert names.index("tile_resample") < names.index("canny")
    detail = answer["module_detail"]
    assert detail["canny"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}
    assert detail["invert"]["sliders"] == [] and detail["shuffle"]["sliders"] == []
    assert detail["inpaint_only"]["sliders"] == []
    assert detail["threshold"]["sliders"][1] == {"name": "Binarization Threshold", "value": 127, "min": 0,
                                                 "max": 255, "step": 0.01}
    assert detail["tile_resample"]["sliders"][1] == {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0,
                                                     "max": 8.0, "step": 0.01}
    assert detail["scribble_xdog"]["sliders"][1]["value"] == 32
    assert detail["blur_gaussian"]["sliders"][1] == {"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0,
                                                     "step": 0.01}
    assert set(detail) == set(names)


def test_module_list_with_alias_names_uses_the_ui_labels():
    answer = module_list(alias_names=True)
    names = answer["module_list"]
    assert "invert (from white bg & black line)" in names and "depth_midas" in names and "depth" not in names
    assert "lineart_standard (from white bg & black line)" in names and "softedge_hed" in names
    assert set(answer["module_detail"]) == set(names)
    plain = module_list()["module_list"]
    assert [get_preprocessor(n).name for n in names] == plain


# ----------------------------------------------------------------------------- helpers


def test_pixel_perfect_resolution():
    assert pixel_perfect_resolution(1024, 768, 512, 512) == 512  # covers: max(512/768, 512/1024) * 768
    assert pixel_perfect_resolution(1024, 768, 512, 512, "resize and fill") == 384  # fits: 0.5 * 768
    assert pixel_perfect_resolution(100, 100, 640, 448, "just resize") == 640


def test_numpy_seed():
    assert numpy_seed(5) == 10 and numpy_seed(5, 7) == 12 and numpy_seed(5, -3) == 5
    assert numpy_seed(2**32 - 1) == 2**32 - 2
