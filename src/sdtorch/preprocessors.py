"""ControlNet preprocessors (annotators), named and computed as the AUTOMATIC1111 ControlNet extension
(Mikubill/sd-webui-controlnet) names and computes them.

    image (PIL) ──HWC3──▶ (H, W, 3) uint8 ──[resize shortest side to processor_res, edge-pad to 64]──▶
        OpenCV / numpy (canny, xdog, threshold...) ──[crop the padding]──▶ hint (PIL RGB)

`PREPROCESSORS` is the one table: a frozen `Preprocessor` per module with the extension's internal name, its UI
label, its sliders (`processor_res`, `threshold_a`, `threshold_b`: labels, defaults, ranges, steps) and either the
computation (weight-free modules) or the weight files its network needs (model-based modules, which sdtorch lists
but does not run). `preprocess` runs one; `module_list` answers as the extension's `/controlnet/module_list` does.

Departures from the extension, on purpose: an out-of-range slider value raises `InvalidInputError` (the extension
silently puts the default in its place; -1 and None still mean "the default"), and the shuffle's random numbers
come from `seed` (a `numpy.random.RandomState`), not numpy's global state.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import cv2
import numpy as np
from PIL import Image

from .errors import InvalidInputError
from .images import DEEP_GREY, load_image
from .request import suggestion


@dataclass(frozen=True)
class Slider:
    """One of a preprocessor's parameters as the extension's `PreprocessorParameter` describes it."""

    label: str
    minimum: float
    maximum: float
    value: float  # the default
    step: float = 0.01  # the extension's default step
    visible: bool = True  # shown in the UI and in `module_detail`

    def api_json(self) -> dict[str, object]:
        """The slider as `/controlnet/module_list` shows it in `module_detail[...]["sliders"]`."""
        return dict(name=self.label, value=self.value, min=self.minimum, max=self.maximum, step=self.step)

    def resolve(self, value: object, module: str, argument: str) -> float:
        """`value` checked against the range; None or -1 (the extension's "unset") give the default."""
        if value is None or (not isinstance(value, bool) and value == -1):
            return float(self.value)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidInputError(f"{module}: {argument} ({self.label}) must be a number, not {value!r}")
        if not math.isfinite(value) or not self.minimum <= value <= self.maximum:
            raise InvalidInputError(f"{module}: {argument} ({self.label}) is {value!r}, outside "
                                    f"{self.minimum}..{self.maximum} (default {self.value})")
        return float(value)


RESOLUTION = Slider("Resolution", 64, 2048, 512, step=8)  # the extension's slider_resolution

# A computation: (image (H, W, 3) uint8 RGB, or (H, W, 4) for inpaint, resolution, threshold_a, threshold_b,
# random state) -> hint (H', W') or (H', W', C) uint8
Run = Callable[[np.ndarray, int, Optional[float], Optional[float], np.random.RandomState], np.ndarray]


@dataclass(frozen=True)
class Preprocessor:
    """A ControlNet preprocessor, as the extension registers it.

    name: the extension's internal key (the API's `module`); label: its UI name (`alias_names=true`); old_names:
    names earlier versions of the extension used. resolution: the `processor_res` slider, None where the module
    ignores it (`visible=False`: used but hidden, fixed by the extension). weights: the files its network needs
    (empty for weight-free modules), kept by the extension in `annotator/downloads/<weights_dir>/`.
    """

    name: str
    label: str
    run: Run | None = None
    resolution: Slider | None = RESOLUTION
    slider_1: Slider | None = None
    slider_2: Slider | None = None
    priority: int = 0  # the extension's sorting_priority: higher is listed first
    tags: tuple[str, ...] = ()  # the extension's control types
    weights: tuple[str, ...] = ()
    weights_dir: str = ""
    requires_mask: bool = False  # inpaint modules: the hint carries the mask
    old_names: tuple[str, ...] = ()

    @property
    def needs_weights(self) -> bool:
        return bool(self.weights)

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every name the module answers to: name, label, old names."""
        return tuple(dict.fromkeys((self.name, self.label, *self.old_names)))

    def sliders(self) -> list[Slider]:
        """The visible sliders, in the extension's order: resolution, threshold_a, threshold_b."""
        return [s for s in (self.resolution, self.slider_1, self.slider_2) if s is not None and s.visible]


# ----------------------------------------------------------------------------- the extension's image helpers


def hwc3(pixels: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8: grey repeated, alpha composited onto
    white as the extension's `HWC3` does (color * a + 255 * (1 - a), truncated)."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] == 1:
        return np.concatenate([pixels] * 3, axis=2)
    if pixels.shape[2] == 4:
        color = pixels[:, :, :3].astype(np.float32)
        alpha = pixels[:, :, 3:4].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return pixels


def to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as the extension's API reads one (np.array, then HWC3): (H, W, 3) uint8 RGB."""
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"expected a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise InvalidInputError(f"the image is empty ({image.width}x{image.height} pixels)")
    if image.mode in DEEP_GREY:
        return np.asarray(load_image(image))  # 16-bit/float grey scaled to 8 bits, not clipped
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return hwc3(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"))


def resize_with_pad(pixels: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The extension's `resize_image_with_pad`: the shorter side scaled to `resolution` (INTER_CUBIC up,
    INTER_AREA down), then edge-padded to multiples of 64. Returns the padded image and the unpadded (H, W)."""
    height, width = pixels.shape[:2]
    k = float(resolution) / float(min(height, width))
    h, w = int(np.round(float(height) * k)), int(np.round(float(width) * k))
    resized = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    if resized.ndim == 2:  # cv2 drops a single channel
        resized = resized[:, :, None]
    pad_h, pad_w = -h % 64, -w % 64  # pad64: ceil(x / 64) * 64 - x
    padded = np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")  # (ceil64(h), ceil64(w), C)
    return np.ascontiguousarray(padded), (h, w)


def pixel_perfect_resolution(width: int, height: int, target_width: int, target_height: int,
                             resize_mode: str = "crop and resize") -> int:
    """The extension's "pixel perfect" processor_res for an image of width x height meeting the output size:
    the shorter side times the scale that fits ("resize and fill") or covers (the other modes) the output."""
    k0, k1 = target_height / height, target_width / width
    k = min(k0, k1) if resize_mode.strip().lower() == "resize and fill" else max(k0, k1)
    return int(np.round(k * float(min(height, width))))


def numpy_seed(seed: int, subseed: int = -1) -> int:
    """The numpy seed the extension uses for a generation's preprocessing (`set_numpy_seed`): seed + subseed
    mod 2**32, where an unset subseed (-1) counts as the seed itself. `seed` is the generation's actual seed."""
    return (int(seed) + (int(seed) if subseed == -1 else max(int(subseed), 0))) & 0xFFFFFFFF


def control_pixels(hint: Image.Image) -> np.ndarray:
    """A hint as the ControlNet receives it: (H, W, 3) float32, RGB / 255. An RGBA hint (inpaint modules: the
    mask in alpha) follows the extension's inpaint protocol: masked pixels (alpha > 127) become -1."""
    pixels = np.asarray(hint.convert("RGBA") if hint.mode == "RGBA" else hint.convert("RGB"), dtype=np.float32) / 255
    if pixels.shape[2] == 3:
        return pixels
    masked = (pixels[:, :, 3:4] > 0.5).astype(np.float32)  # (H, W, 1)
    return pixels[:, :, :3] * (1 - masked) - masked  # c * (1 - m) - m


# ----------------------------------------------------------------------------- weight-free computations


def _none(img: np.ndarray, res: int, a: float | None, b: float | None, rng: np.random.RandomState) -> np.ndarray:
    return img


def _invert(img: np.ndarray, res: int, a: float | None, b: float | None, rng: np.random.RandomState) -> np.ndarray:
    return 255 - img


def _canny(img: np.ndarray, res: int, a: float | None, b: float | None, rng: np.random.RandomState) -> np.ndarray:
    padded, (h, w) = resize_with_pad(img, res)
    return cv2.Canny(padded, int(a), int(b))[:h, :w]  # gradients of all three channels, the strongest wins


def _threshold(img: np.ndarray, res: int, a: float | None, b: float | None,
               rng: np.random.RandomState) -> np.ndarray:
    padded, (h, w) = resize_with_pad(img, res)
    return np.where(padded.min(axis=2) > a, 255, 0).astype(np.uint8)[:h, :w]  # white where every channel > a


def _scribble_xdog(img: np.ndarray, res: int, a: float | None, b: float | None,
                   rng: np.random.RandomState) -> np.ndarray:
    padded, (h, w) = resize_with_pad(img, res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)  # difference of Gaussians
    return np.where(2 * (255 - dog) > a, 255, 0).astype(np.uint8)[:h, :w]


def _lineart_standard(img: np.ndarray, res: int, a: float | None, b: float | None,
                      rng: np.random.RandomState) -> np.ndarray:
    padded, (h, w) = resize_with_pad(img, res)
    x = padded.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)  # darker than surroundings
    strong = intensity[intensity > 8]  # median over the padded image, as the extension takes it
    intensity /= max(16, np.median(strong)) if strong.size else 16
    return (intensity * 127).clip(0, 255).astype(np.uint8)[:h, :w]


def _blur_gaussian(img: np.ndarray, res: int, a: float | None, b: float | None,
                   rng: np.random.RandomState) -> np.ndarray:
    padded, (h, w) = resize_with_pad(img, res)
    return cv2.GaussianBlur(np.ascontiguousarray(padded[:h, :w]), (0, 0), float(a))  # cropped first, then blurred


def _tile_resample(img: np.ndarray, res: int, a: float | None, b: float | None,
                   rng: np.random.RandomState) -> np.ndarray:
    if a < 1.1:  # the extension's cut-off: the image as it is, at its own size
        return img
    height, width = img.shape[:2]
    size = (max(int(float(width) / a), 1), max(int(float(height) / a), 1))  # (the extension fails at 0)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def _noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> np.ndarray:
    """The extension's make_noise_disk (one channel): uniform noise on a coarse (f px) grid, cubic-upsampled,
    cropped and scaled to 0..1. (h, w, 1) float64."""
    noise = rng.uniform(low=0, high=1, size=(h // f + 2, w // f + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


def _shuffle(img: np.ndarray, res: int, a: float | None, b: float | None, rng: np.random.RandomState) -> np.ndarray:
    padded, (h, w) = resize_with_pad(img, res)
    img = np.ascontiguousarray(padded[:h, :w])
    x = _noise_disk(rng, h, w, 256) * float(w - 1)  # where each pixel samples from, smooth random flow
    y = _noise_disk(rng, h, w, 256) * float(h - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)  # (h, w, 2)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


def _recolor_luminance(img: np.ndarray, res: int, a: float | None, b: float | None,
                       rng: np.random.RandomState) -> np.ndarray:
    # The extension passes its RGB array as BGR: red and blue trade places in the L* it takes
    lightness = cv2.cvtColor(img, cv2.COLOR_BGR2LAB)[:, :, 0].astype(np.float32) / 255.0
    return ((lightness ** a) * 255.0).clip(0, 255).astype(np.uint8)


def _recolor_intensity(img: np.ndarray, res: int, a: float | None, b: float | None,
                       rng: np.random.RandomState) -> np.ndarray:
    value = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[:, :, 2].astype(np.float32) / 255.0  # V = max(R, G, B)
    return ((value ** a) * 255.0).clip(0, 255).astype(np.uint8)


def _color_grid(img: np.ndarray, res: int, a: float | None, b: float | None,
                rng: np.random.RandomState) -> np.ndarray:
    height, width = img.shape[:2]  # shorter side to res (INTER_AREA either way), then 64-px colour cells
    h, w = (res, int(round(width / height * res))) if height < width else (int(round(height / width * res)), res)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    cells = cv2.resize(img, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)


# ----------------------------------------------------------------------------- the table

_HIDDEN = Slider("Resolution", 64, 2048, 512, step=8, visible=False)  # used, but the extension fixes it at 512


def _model(name: str, label: str, weights_dir: str, *weights: str, **kw: object) -> Preprocessor:
    return Preprocessor(name, label, weights=weights, weights_dir=weights_dir, **kw)  # type: ignore[arg-type]


_MIDAS = "dpt_hybrid-midas-501f0c75.pt"
_OPENPOSE = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")  # the extension loads all three
_REMOVE = dict(slider_1=Slider("Remove Near %", 0, 100, 0, step=0.1),
               slider_2=Slider("Remove Background %", 0, 100, 0, step=0.1))
_SAFE_STEPS = Slider("Safe Steps", 0, 10, 2, step=1)

_ALL: tuple[Preprocessor, ...] = (
    # weight-free
    Preprocessor("none", "none", _none, priority=10, tags=("InstructP2P",)),  # resolution shown, unused
    Preprocessor("canny", "canny", _canny, slider_1=Slider("Low Threshold", 1, 255, 100, step=1),
                 slider_2=Slider("High Threshold", 1, 255, 200, step=1), priority=100, tags=("Canny",)),
    Preprocessor("invert", "invert (from white bg & black line)", _invert, resolution=None, priority=20,
                 tags=("Canny", "Lineart", "Scribble", "MLSD")),
    Preprocessor("blur_gaussian", "blur_gaussian", _blur_gaussian, slider_1=Slider("Sigma", 0.01, 64.0, 9.0),
                 tags=("Tile",)),
    Preprocessor("scribble_xdog", "scribble_xdog", _scribble_xdog, slider_1=Slider("XDoG Threshold", 1, 64, 32),
                 tags=("Scribble", "SparseCtrl")),
    Preprocessor("shuffle", "shuffle", _shuffle, resolution=_HIDDEN, tags=("Shuffle",)),
    Preprocessor("threshold", "threshold", _threshold, slider_1=Slider("Binarization Threshold", 0, 255, 127)),
    Preprocessor("tile_resample", "tile_resample", _tile_resample,
                 slider_1=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, step=0.01), priority=100, tags=("Tile",)),
    Preprocessor("lineart_standard", "lineart_standard (from white bg & black line)", _lineart_standard,
                 priority=100, tags=("Lineart",)),
    Preprocessor("recolor_luminance", "recolor_luminance", _recolor_luminance,
                 slider_1=Slider("Gamma Correction", 0.1, 2.0, 1.0, step=0.001), priority=100, tags=("Recolor",)),
    Preprocessor("recolor_intensity", "recolor_intensity", _recolor_intensity,
                 slider_1=Slider("Gamma Correction", 0.1, 2.0, 1.0, step=0.001), tags=("Recolor",)),
    Preprocessor("color", "t2ia_color_grid", _color_grid, tags=("T2I-Adapter",)),
    Preprocessor("inpaint", "inpaint_global_harmonious", _none, resolution=None, tags=("Inpaint",),
                 requires_mask=True),
    Preprocessor("inpaint_only", "inpaint_only", _none, resolution=None, priority=100, tags=("Inpaint",),
                 requires_mask=True),
    # model-based: listed, not run
    _model("depth", "depth_midas", "midas", _MIDAS, priority=100, tags=("Depth",)),
    _model("depth_leres", "depth_leres", "leres", "res101.pth", tags=("Depth",), **_REMOVE),
    _model("depth_leres++", "depth_leres++", "leres", "res101.pth", "latest_net_G.pth", tags=("Depth",), **_REMOVE),
    _model("depth_zoe", "depth_zoe", "zoedepth", "ZoeD_M12_N.pt", tags=("Depth",)),
    _model("depth_anything", "depth_anything", "depth_anything", "depth_anything_vitl14.pth", tags=("Depth",)),
    _model("depth_anything_v2", "depth_anything_v2", "depth_anything_v2", "depth_anything_v2_vitl.safetensors",
           tags=("Depth",)),
    _model("depth_hand_refiner", "depth_hand_refiner", "hand_refiner", "graphormer_hand_state_dict.bin",
           "hrnetv2_w64_imagenet_pretrained.pth", tags=("Depth",)),
    _model("normal_map", "normal_midas", "midas", _MIDAS, tags=("NormalMap",),
           slider_1=Slider("Normal Background Threshold", 0.0, 1.0, 0.4, step=0.01)),
    _model("normal_bae", "normal_bae", "normal_bae", "scannet.pt", priority=100, tags=("NormalMap",)),
    _model("normal_dsine", "normal_dsine", "normal_dsine", "dsine.pt", tags=("NormalMap",),
           slider_1=Slider("Fov", 0, 360, 60, step=0.1), slider_2=Slider("Iterations", 1, 20, 5, step=1)),
    _model("openpose", "openpose", "openpose", *_OPENPOSE, tags=("OpenPose",)),
    _model("openpose_face", "openpose_face", "openpose", *_OPENPOSE, tags=("OpenPose",)),
    _model("openpose_faceonly", "openpose_faceonly", "openpose", *_OPENPOSE, tags=("OpenPose",)),
    _model("openpose_hand", "openpose_hand", "openpose", *_OPENPOSE, tags=("OpenPose",)),
    _model("openpose_full", "openpose_full", "openpose", *_OPENPOSE, priority=100, tags=("OpenPose",)),
    _model("dw_openpose_full", "dw_openpose_full", "openpose", "yolox_l.onnx", "dw-ll_ucoco_384.onnx",
           tags=("OpenPose",)),
    _model("animal_openpose", "animal_openpose", "openpose", "yolox_l.onnx",
           "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx", tags=("OpenPose",)),
    _model("densepose", "densepose (pruple bg & purple torso)", "densepose", "densepose_r50_fpn_dl.torchscript",
           tags=("OpenPose",)),
    _model("densepose_parula", "densepose_parula (black bg & blue torso)", "densepose",
           "densepose_r50_fpn_dl.torchscript", tags=("OpenPose",)),
    _model("lineart", "lineart_realistic", "lineart", "sk_model.pth", tags=("Lineart",)),
    _model("lineart_coarse", "lineart_coarse", "lineart", "sk_model2.pth", tags=("Lineart",)),
    _model("lineart_anime", "lineart_anime", "lineart_anime", "netG.pth", tags=("Lineart",)),
    _model("lineart_anime_denoise", "lineart_anime_denoise", "manga_line", "erika.pth", tags=("Lineart",)),
    _model("hed", "softedge_hed", "hed", "ControlNetHED.pth", tags=("SoftEdge",)),
    _model("hed_safe", "softedge_hedsafe", "hed", "ControlNetHED.pth", tags=("SoftEdge",)),
    _model("pidinet", "softedge_pidinet", "pidinet", "table5_pidinet.pth", priority=100, tags=("SoftEdge",)),
    _model("pidinet_safe", "softedge_pidisafe", "pidinet", "table5_pidinet.pth", tags=("SoftEdge",)),
    _model("softedge_teed", "softedge_teed", "TEED", "7_model.pth", slider_1=_SAFE_STEPS, tags=("SoftEdge",),
           old_names=("te_hed",)),
    _model("softedge_anyline", "softedge_anyline", "TEED", "MTEED.pth", slider_1=_SAFE_STEPS, tags=("SoftEdge",),
           resolution=Slider("Resolution", 64, 2048, 1280, step=8)),
    _model("scribble_hed", "scribble_hed", "hed", "ControlNetHED.pth", tags=("Scribble", "SparseCtrl")),
    _model("pidinet_scribble", "scribble_pidinet", "pidinet", "table5_pidinet.pth", priority=100,
           tags=("Scribble", "SparseCtrl")),
    _model("pidinet_sketch", "t2ia_sketch_pidi", "pidinet", "table5_pidinet.pth", tags=("T2I-Adapter",)),
    _model("mlsd", "mlsd", "mlsd", "mlsd_large_512_fp32.pth", priority=100, tags=("MLSD",),
           slider_1=Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, step=0.01),
           slider_2=Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, step=0.01)),
    _model("segmentation", "seg_ufade20k", "uniformer", "upernet_global_small.pth", tags=("Segmentation",)),
    _model("oneformer_ade20k", "seg_ofade20k", "oneformer", "250_16_swin_l_oneformer_ade20k_160k.pth", priority=100,
           tags=("Segmentation",)),
    _model("oneformer_coco", "seg_ofcoco", "oneformer", "150_16_swin_l_oneformer_coco_100ep.pth",
           tags=("Segmentation",)),
    _model("anime_face_segment", "seg_anime_face", "anime_face_segment", "UNet.pth", tags=("Segmentation",)),
    _model("mobile_sam", "mobile_sam", "mobile_sam", "mobile_sam.pt", tags=("Segmentation",)),
    _model("inpaint_only+lama", "inpaint_only+lama", "lama", "ControlNetLama.pth", resolution=None,
           tags=("Inpaint",), requires_mask=True),
)

PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in _ALL}
_BY_ALIAS: dict[str, Preprocessor] = {alias.lower(): p for p in _ALL for alias in p.aliases}
assert len(_BY_ALIAS) == sum(len(p.aliases) for p in _ALL), "two preprocessors share a name"


def get_preprocessor(name: str) -> Preprocessor:
    """The preprocessor called `name`: its name, UI label or an old name, in any case. Unknown -> InvalidInputError."""
    found = _BY_ALIAS.get(str(name).strip().lower()) if isinstance(name, str) else None
    if found is None:
        names = [alias for p in _ALL for alias in p.aliases]
        raise InvalidInputError(f"unknown ControlNet preprocessor {name!r}{suggestion(str(name), names)} "
                                "(module_list() lists them)")
    return found


def sorted_preprocessors() -> list[Preprocessor]:
    """All preprocessors in the extension's order: "none" first, then by priority and label, descending."""
    rest = [p for p in _ALL if p.name != "none"]
    return [PREPROCESSORS["none"]] + sorted(rest, key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)


def module_list(alias_names: bool = False) -> dict[str, object]:
    """What the extension's `GET /controlnet/module_list?alias_names=...` answers: `module_list` (internal names,
    or UI labels with alias_names) and `module_detail` per module: `model_free` (the extension's flag for modules
    that need no ControlNet model, reference_* and revision_*, none of which sdtorch lists: always False) and
    `sliders` (the visible ones: resolution, threshold_a, threshold_b)."""
    modules = sorted_preprocessors()
    names = [p.label if alias_names else p.name for p in modules]
    detail = {n: dict(model_free=False, sliders=[s.api_json() for s in p.sliders()]) for n, p in zip(names, modules)}
    return {"module_list": names, "module_detail": detail}


# ----------------------------------------------------------------------------- running one


def _check_weights(p: Preprocessor, weights: str | os.PathLike | None) -> None:
    """A model-based module: says which files it needs and how to give them; sdtorch does not run these networks."""
    files = ", ".join(p.weights)
    where = (f"the A1111 ControlNet extension downloads {'it' if len(p.weights) == 1 else 'them'} into "
             f"extensions/sd-webui-controlnet/annotator/downloads/{p.weights_dir}/")
    if weights is None:
        raise InvalidInputError(
            f"preprocessor {p.label!r} runs a network and needs its weights: {files} ({where}); pass weights=<path "
            f"to {'the file' if len(p.weights) == 1 else 'the folder holding them'}>, or give an already "
            "preprocessed control image with module 'none'")
    path = os.fspath(weights)
    if os.path.isdir(path):
        missing = [f for f in p.weights if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise InvalidInputError(f"preprocessor {p.label!r}: {path!r} lacks {', '.join(missing)} ({where})")
    elif not os.path.isfile(path):
        raise InvalidInputError(f"preprocessor {p.label!r}: weights {path!r}: no such file or folder")
    elif len(p.weights) > 1:
        raise InvalidInputError(f"preprocessor {p.label!r} needs {len(p.weights)} files ({files}): pass the folder "
                                f"holding them, not the file {path!r}")
    raise InvalidInputError(f"preprocessor {p.label!r}: sdtorch does not run its network yet; preprocess the image "
                            "with the A1111 extension (or controlnet_aux) and give the result with module 'none'")


def _with_mask(pixels: np.ndarray, mask: Image.Image | None, p: Preprocessor) -> np.ndarray:
    """(H, W, 3) + mask -> (H, W, 4): the mask's first channel (after HWC3, as the extension's API reads masks)
    in alpha, 255 = inpaint."""
    if mask is None:
        raise InvalidInputError(f"preprocessor {p.label!r} needs a mask (white = the area to inpaint)")
    alpha = to_array(mask)[:, :, :1]
    if alpha.shape[:2] != pixels.shape[:2]:
        raise InvalidInputError(f"preprocessor {p.label!r}: the mask is {alpha.shape[1]}x{alpha.shape[0]}, the image "
                                f"{pixels.shape[1]}x{pixels.shape[0]}: they must be the same size")
    return np.concatenate([pixels, alpha], axis=2)


def preprocess(
    name: str,
    image: Image.Image,
    resolution: int | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    mask: Image.Image | None = None,
) -> Image.Image:
    """The control hint preprocessor `name` makes of `image`, as the A1111 ControlNet extension makes it.

    resolution: the extension's processor_res; threshold_a / threshold_b: its two sliders (meaning per module:
    `get_preprocessor(name).slider_1`...). None or -1 means the module's default; values outside a slider's range
    raise InvalidInputError; a slider the module lacks is ignored. seed: the numpy seed of random modules
    (shuffle; `numpy_seed` gives the extension's for a generation). weights: the network's file or folder for
    model-based modules. mask: required by the inpaint modules, whose hint is RGBA with the mask in alpha
    (`control_pixels` turns it into the ControlNet's input, masked pixels -1). Other hints are RGB; most come out
    at `resolution` on the shorter side (invert, none, tile_resample, recolor_*: the image's own size).
    """
    p = get_preprocessor(name)
    if p.needs_weights:
        _check_weights(p, weights)
    res = p.resolution.resolve(resolution, p.label, "resolution") if p.resolution is not None else 0.0
    if not res.is_integer():
        raise InvalidInputError(f"{p.label}: resolution must be a whole number of pixels, not {resolution!r}")
    a = p.slider_1.resolve(threshold_a, p.label, "threshold_a") if p.slider_1 is not None else None
    b = p.slider_2.resolve(threshold_b, p.label, "threshold_b") if p.slider_2 is not None else None
    pixels = to_array(image)  # (H, W, 3) uint8
    if p.requires_mask:
        pixels = _with_mask(pixels, mask, p)  # (H, W, 4)
    assert p.run is not None
    hint = p.run(pixels, int(res), a, b, np.random.RandomState(int(seed) & 0xFFFFFFFF))
    return Image.fromarray(hint if p.requires_mask else hwc3(hint))
