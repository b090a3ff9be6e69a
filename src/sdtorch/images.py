"""Image and mask preparation for img2img and inpainting, the AUTOMATIC1111 way.

What goes in and out is PIL; only the two inputs of a 9-channel inpainting UNet (and the pixel
tensor helpers) are torch. The steps follow A1111's `modules/images.py`, `modules/masking.py` and
`StableDiffusionProcessingImg2Img.init`; the inpainting-UNet inputs follow diffusers'
StableDiffusionInpaintPipeline, which the pipeline's parity tests compare against.

A whole-picture inpaint, step by step:

    image = resize_image(load_image(path), W, H, mode)       # RGB, W x H
    mask = load_mask(mask_path, W, H, blur=4, resize_mode=mode)  # L, 255 = repaint
    ... generate with mask_to_latent(mask, H // 8, W // 8) / masked_image(image, mask) ...
    result = paste_back(image, generated, None, mask)

"Only masked" (A1111's inpaint full res) works at the original size instead:

    mask = load_mask(mask_path, image.width, image.height, blur=4)
    region = expand_to_aspect(crop_region(mask, padding), W, H, image.width, image.height)
    crop, crop_mask = crop_for_inpaint(image, region, W, H), crop_for_inpaint(mask, region, W, H)
    ... generate a W x H picture from crop / crop_mask ...
    result = paste_back(image, generated, region, mask)
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps

from .errors import InvalidInputError
from .request import RESIZE_MODES

ImageSource = Union[str, os.PathLike, bytes, PIL.Image.Image]
Region = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive

LANCZOS = PIL.Image.Resampling.LANCZOS
BACKGROUND = "#ffffff"  # A1111's img2img_background_color: what transparent pixels become
MAX_PIXELS = 2**27  # 134 megapixels (16384 x 8192): larger images are refused, files before decoding
DEEP_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # modes Pillow's convert("L") clips at 255


# ----------------------------------------------------------------------------- loading


def _open(source: ImageSource) -> PIL.Image.Image:
    """Open and fully decode an image; any failure -> InvalidInputError naming the source.

    EXIF orientation is applied, deep greyscale becomes 8-bit (`_to_8bit`) and of an animated or
    multi-frame file only the first frame is read. Empty images and ones over MAX_PIXELS are refused.
    """
    if isinstance(source, PIL.Image.Image):
        _check_pixels(source.size, "<PIL image>")
        return _to_8bit(ImageOps.exif_transpose(source), "<PIL image>")
    if isinstance(source, (bytes, bytearray)):
        name, stream = f"<{len(source)} bytes>", io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.exists(name):
            raise InvalidInputError(f"cannot read image {name!r}: no such file")
        if os.path.isdir(name):
            raise InvalidInputError(f"cannot read image {name!r}: it is a directory, not an image file")
        stream = name
    else:
        raise InvalidInputError(f"expected an image path, bytes or a PIL image, got {type(source).__name__}")
    try:
        with PIL.Image.open(stream) as opened:
            _check_pixels(opened.size, name)  # from the header, before decoding anything
            key = _png_colour_key(opened)
            opened.load()  # decode now, so a truncated file fails here and not deep inside a resize
            if key is not None:
                opened.info["transparency"] = key
            image = ImageOps.exif_transpose(opened)
    except InvalidInputError:
        raise
    except PIL.UnidentifiedImageError:
        raise InvalidInputError(f"cannot read image {name!r}: not an image format Pillow recognises") from None
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"cannot read image {name!r}: {exc}") from None
    return _to_8bit(image, name)


def _check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse an empty image (a side of 0 pixels) or one of more than MAX_PIXELS pixels."""
    width, height = size
    if width == 0 or height == 0:
        raise InvalidInputError(f"cannot read image {name!r}: it is empty ({width}x{height} pixels)")
    if width * height > MAX_PIXELS:
        raise InvalidInputError(
            f"cannot read image {name!r}: {width}x{height} is {width * height:,} pixels, more than the "
            f"{MAX_PIXELS:,} allowed; scale it down first"
        )


def _png_colour_key(image: PIL.Image.Image) -> int | tuple[int, ...] | None:
    """A PNG's tRNS colour key in the 8-bit samples Pillow decodes, where Pillow leaves it in the file's depth.

    Pillow scales 2- and 4-bit greyscale up to 0..255 and keeps the top byte of 16-bit RGB samples,
    but not the key. The low bytes are gone, so a 16-bit RGB key also keys every pixel that shares
    its top bytes. None where Pillow's key is already right. Call before load(): it reads the tile.
    """
    key = image.info.get("transparency")
    if image.format != "PNG" or key is None or not image.tile:
        return None
    rawmode = image.tile[0][3]  # (codec, extents, offset, rawmode)
    if rawmode in ("L;2", "L;4"):
        return key * 255 // (2 ** int(rawmode[2:]) - 1)
    if rawmode == "RGB;16B":
        return tuple(value >> 8 for value in key)
    return None


def _to_8bit(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """Deep greyscale ("I;16*", "I", "F") as 8-bit "L" ("LA" if a colour key makes pixels transparent).

    Pillow's own convert("L") clips these at 255. Values are divided by a full scale, times 255, rounded:
    - "I;16", "I;16B", "I;16L", "I;16N" (16-bit): 65535.
    - "I" (32-bit integers: 16-bit PGM and signed TIFF, numpy int32) and "F" (32-bit float), which
      carry no bit depth: 1, 255 or 65535, the smallest that holds the largest value; so 0..1 floats,
      8-bit values and 16-bit values each read right. Values below 0 or above 65535, NaN and infinity
      have no known scale: refused.
    Any other mode is returned as it is.
    """
    if image.mode not in DEEP_GREY:
        return image
    pixels = np.asarray(image)  # (H, W)
    if image.mode.startswith("I;16"):
        full_scale = 65535
    else:
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 65535:
            raise InvalidInputError(
                f"cannot read image {name!r}: mode {image.mode} with values {low:g}..{high:g} has no known "
                "range (0..1, 0..255 or 0..65535 expected); save it as an 8- or 16-bit image"
            )
        full_scale = next(scale for scale in (1, 255, 65535) if high <= scale)
    grey = np.rint(pixels.astype(np.float32) * np.float32(255 / full_scale)).astype(np.uint8)  # (H, W)
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return PIL.Image.fromarray(grey)
    alpha = np.where(pixels == key, 0, 255).astype(np.uint8)  # the key matched at full depth
    return PIL.Image.fromarray(np.stack([grey, alpha], axis=-1))  # (H, W, 2): "LA"


def _with_alpha(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGBA if the image carries any transparency (alpha band or palette/colour-key transparency), else as is."""
    if image.mode == "La":  # premultiplied: Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        return image.convert("RGBA")
    return image


def load_image_with_alpha(source: ImageSource) -> PIL.Image.Image:
    """An RGBA image where the source carries any transparency, else RGB; read as `load_image` reads it (EXIF
    orientation, deep greyscale scaled, the first frame) but with transparent pixels kept, as A1111's Extras keeps
    them."""
    image = _with_alpha(_open(source))
    return image if image.mode == "RGBA" else image.convert("RGB")


def load_alpha(source: ImageSource) -> PIL.Image.Image:
    """The image's transparency as an "L" image (255 opaque, 0 transparent; all 255 for an image without any),
    read as `load_image` reads its colours (EXIF orientation, the first frame)."""
    image = _with_alpha(_open(source))
    return image.getchannel("A") if image.mode == "RGBA" else PIL.Image.new("L", image.size, 255)


def load_image(source: ImageSource) -> PIL.Image.Image:
    """An RGB image from a path, encoded bytes or a PIL image.

    EXIF orientation is applied, 16-bit, 32-bit and float greyscale are scaled to 8 bits (see
    `_to_8bit`; 16-bit colour comes from Pillow as its top byte), other modes (1, L, P, CMYK, YCbCr,
    LAB, HSV, ...) go through Pillow's conversion, and transparent pixels (alpha band, palette or
    colour-key transparency) are flattened onto white (A1111's `images.flatten` with the default
    img2img background colour). Of an animated image, the first frame.
    """
    image = _with_alpha(_open(source))
    if image.mode == "RGBA":
        flat = PIL.Image.new("RGBA", image.size, BACKGROUND)
        flat.paste(image, mask=image)  # alpha-weighted blend onto the background
        image = flat
    return image.convert("RGB")


# ----------------------------------------------------------------------------- resizing


def _resize_mode(mode: str | int) -> int:
    """A resize mode as A1111's integer: 0 just resize, 1 crop and resize, 2 resize and fill."""
    if isinstance(mode, str) and mode.strip().lower() in RESIZE_MODES:
        return RESIZE_MODES.index(mode.strip().lower())
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        return mode
    valid = ", ".join(f"{i} {name!r}" for i, name in enumerate(RESIZE_MODES))
    raise InvalidInputError(f"unknown resize mode {mode!r}; valid modes: {valid}")


def resize_image(image: PIL.Image.Image, width: int, height: int, mode: str | int = "just resize") -> PIL.Image.Image:
    """Resize to exactly `width` x `height` as A1111's `images.resize_image` does (LANCZOS, no upscaler model).

    - 0 "just resize": stretch to the size, aspect ratio not kept.
    - 1 "crop and resize": scale to cover the size, keep the aspect ratio, centre-crop the excess.
    - 2 "resize and fill": scale to fit inside, centre it, and fill each empty border by stretching
      the picture's outermost row (or column) across it.
    """
    mode = _resize_mode(mode)
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"resize target must be positive, got {width}x{height}")
    if mode == 0:
        return image.resize((width, height), resample=LANCZOS)

    ratio, src_ratio = width / height, image.width / image.height
    # Mode 1 covers the target, mode 2 fits inside it; the other side keeps the aspect ratio (floored).
    width_bound = ratio > src_ratio if mode == 1 else ratio < src_ratio
    if width_bound:
        scaled_w, scaled_h = width, max(image.height * width // image.width, 1)
    else:
        scaled_w, scaled_h = max(image.width * height // image.height, 1), height
    scaled = image.resize((scaled_w, scaled_h), resample=LANCZOS)
    left, top = width // 2 - scaled_w // 2, height // 2 - scaled_h // 2
    result = PIL.Image.new(image.mode, (width, height))
    result.paste(scaled, (left, top))  # negative offsets crop (mode 1)
    if mode == 2:
        _fill_borders(result, scaled, left, top)
    return result


def _fill_borders(result: PIL.Image.Image, scaled: PIL.Image.Image, left: int, top: int) -> None:
    """Fill the empty bands around a centred picture by stretching its edge rows or columns (in place).

    A resize box of zero thickness samples, with PIL's default filter, right at the picture's edge,
    as A1111 does.
    """
    width, height = result.size
    if top > 0:  # bands above and below
        for y, dest in ((0, 0), (scaled.height, top + scaled.height)):
            result.paste(scaled.resize((width, top), box=(0, y, width, y)), (0, dest))
    elif left > 0:  # bands left and right
        for x, dest in ((0, 0), (scaled.width, left + scaled.width)):
            result.paste(scaled.resize((left, height), box=(x, 0, x, height)), (dest, 0))


def check_size(width: int, height: int) -> None:
    """Raise InvalidInputError unless width and height are positive multiples of 8 (the VAE's stride)."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0 for v in (width, height))
    if not ok:
        hint = ""
        if all(isinstance(v, (int, float)) and v >= 8 for v in (width, height)):
            hint = f" (nearest below: {int(width) // 8 * 8}x{int(height) // 8 * 8})"
        raise InvalidInputError(f"width and height must be positive multiples of 8, got {width!r}x{height!r}{hint}")


# ----------------------------------------------------------------------------- masks


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel: `size` integer taps in 1/256ths that sum to exactly 256.

    Taps are exp(-d^2 / (2 sigma^2)) normalised, rounded from the outside in while carrying each
    rounding error to the next tap, with the centre tap taking whatever is left (OpenCV's
    getGaussianKernelBitExact + getGaussianKernelFixedPoint_ED, 8 fraction bits).
    """
    half = size // 2
    weights = np.exp(-((np.arange(size) - half) ** 2) / (2.0 * sigma * sigma))
    weights /= 2.0 * weights[:half].sum() + 1.0
    taps = np.empty(size, dtype=np.int64)
    carry = 0.0
    for i in range(half):
        exact = weights[i] * 256.0 + carry
        taps[i] = taps[size - 1 - i] = round(exact)  # ties to even, as cvRound
        carry = exact - taps[i]
    taps[half] = 256 - 2 * taps[:half].sum()
    return taps


def _blur_axis(pixels: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """cv2.GaussianBlur along one axis of a uint8 array, as A1111 calls it (ksize 2*int(2.5 sigma + 0.5) + 1).

    OpenCV's bit-exact 8-bit path: integer taps in 1/256ths, reflect-101 borders, round half up.
    """
    n = pixels.shape[axis]
    if sigma <= 0 or n == 1:  # OpenCV drops the kernel along a 1-pixel side
        return pixels
    size = 2 * int(2.5 * sigma + 0.5) + 1
    taps, half = _gaussian_taps(size, sigma), size // 2
    period = 2 * (n - 1)  # reflect-101: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
    index = np.abs(np.arange(-half, n + half)) % period
    index = np.where(index >= n, period - index, index)
    padded = np.ascontiguousarray(np.moveaxis(pixels, axis, -1).astype(np.int32)[..., index])  # (.., n + 2 half)
    total = np.zeros(padded.shape[:-1] + (n,), dtype=np.int32)  # at most 255 * 256
    for k, tap in enumerate(taps):
        total += int(tap) * padded[..., k : k + n]
    return np.moveaxis((total + 128) >> 8, -1, axis).astype(np.uint8)


def blur_mask(mask: PIL.Image.Image, blur: int | tuple[int, int]) -> PIL.Image.Image:
    """A1111's "mask blur": a Gaussian of standard deviation `blur` pixels, first along x, then along y.

    `blur` may be one number or (x, y) as A1111's mask_blur_x / mask_blur_y.
    """
    blur_x, blur_y = (blur, blur) if isinstance(blur, (int, float)) else blur
    if blur_x < 0 or blur_y < 0:
        raise InvalidInputError(f"mask blur must be >= 0, got {blur!r}")
    pixels = np.asarray(mask.convert("L"))  # (H, W)
    pixels = _blur_axis(pixels, blur_x, axis=1)
    pixels = _blur_axis(pixels, blur_y, axis=0)
    return PIL.Image.fromarray(pixels, mode="L")


def load_mask(
    source: ImageSource,
    width: int,
    height: int,
    blur: int | tuple[int, int] = 4,
    invert: bool = False,
    resize_mode: str | int = "just resize",
) -> PIL.Image.Image:
    """An inpainting mask, mode "L", `width` x `height`, 255 = repaint, 0 = keep.

    The file is read as `load_image` reads it (EXIF orientation, first frame, deep greyscale scaled
    to 8 bits), so a 16-bit mask thresholds and blurs exactly as its 8-bit equivalent. Then, as
    A1111 prepares it: a mask with any pixel not fully opaque (alpha band, palette or colour-key
    transparency: a painted layer) means its alpha alone, opaque > 128 -> 255, else 0, colours
    ignored; any other image (a fully opaque one too) means its luminance. Then the optional invert,
    the Gaussian mask blur (in the mask's own pixels, before resizing, as A1111 does), and the
    resize with `resize_mode` to the target size.
    """
    image = _with_alpha(_open(source))
    if image.mode == "RGBA" and image.getextrema()[3] != (255, 255):
        mask = image.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    else:
        mask = image.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, blur)
    return resize_image(mask, width, height, resize_mode).convert("L")


# ----------------------------------------------------------------------------- only masked (inpaint full res)


def crop_region(mask: PIL.Image.Image, padding: int) -> Region | None:
    """The box (x1, y1, x2, y2) around every non-zero mask pixel, grown by `padding` and clamped to the image.

    None for an all-black mask (A1111 then falls back to inpainting the whole picture).
    """
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def _grow(lo: int, hi: int, by: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) by `by` pixels split about its centre, shifted (then clipped) to stay inside [0, limit)."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_to_aspect(region: Region, width: int, height: int, image_width: int, image_height: int) -> Region:
    """Grow `region` to the aspect ratio of `width` x `height`, staying inside the image (A1111 expand_crop_region).

    Only the short side grows (by the whole-pixel shortfall, half on each side); where that would
    leave the image the region slides back in, and is clipped if it is bigger than the image.
    """
    x1, y1, x2, y2 = region
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:  # too wide: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / target - (y2 - y1)), image_height)
    else:  # too tall (or exact): grow the width
        x1, x2 = _grow(x1, x2, int((y2 - y1) * target - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def crop_for_inpaint(image: PIL.Image.Image, region: Region, width: int, height: int) -> PIL.Image.Image:
    """The region of an image or mask, brought to `width` x `height` with "resize and fill" (as A1111 does)."""
    return resize_image(image.crop(region), width, height, "resize and fill")


def _same_size(image: PIL.Image.Image, mask: PIL.Image.Image) -> None:
    if image.size != mask.size:
        raise InvalidInputError(f"mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")


def paste_back(
    original: PIL.Image.Image, generated: PIL.Image.Image, region: Region | None, mask: PIL.Image.Image
) -> PIL.Image.Image:
    """Composite a generated picture onto the original through the mask (A1111's uncrop + apply_overlay).

    With a `region` ("only masked"), `generated` is the crop's generation: it is brought to the
    region's size with "crop and resize", placed there, and the original shows through wherever
    the (blurred) mask is below 255. With `region=None` ("whole picture"), `generated` has the
    original's size and A1111 doubles the mask first (clip(2 * mask)), so the blur's inner half
    repaints fully. Pixels where the mask is 0 are the original's, exactly.
    """
    _same_size(original, mask)
    mask = mask.convert("L")
    if region is None:
        if generated.size != original.size:
            raise InvalidInputError(
                f"generated image is {generated.width}x{generated.height}, expected {original.width}x{original.height}"
            )
        mask = mask.point(lambda v: min(2 * v, 255))
        canvas = generated.convert("RGBA")
    else:
        x1, y1, x2, y2 = region
        canvas = PIL.Image.new("RGBA", original.size)  # transparent outside the region
        canvas.paste(resize_image(generated, x2 - x1, y2 - y1, "crop and resize"), (x1, y1))

    # The original, made transparent where the mask repaints (premultiplied paste as A1111 does).
    overlay = PIL.Image.new("RGBa", original.size)
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    canvas.alpha_composite(overlay.convert("RGBA"))
    return canvas.convert("RGB")


# ----------------------------------------------------------------------------- tensors (inpainting UNet inputs)


def image_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess computes it."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0  # (1, 3, H, W)


def tensor_to_images(images: torch.Tensor) -> list[PIL.Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounded as diffusers' VaeImageProcessor.postprocess does."""
    pixels = (images.detach() / 2 + 0.5).clamp(0, 1)  # in the input's dtype, as diffusers does
    pixels = pixels.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3)
    return [PIL.Image.fromarray(p) for p in (pixels * 255).round().astype(np.uint8)]


def _binary_mask(mask: PIL.Image.Image) -> torch.Tensor:
    """L mask -> (1, 1, H, W) float32 of 0/1: 1 where value / 255 >= 0.5 (diffusers' binarize)."""
    values = torch.from_numpy(np.asarray(mask.convert("L")).astype(np.float32) / 255.0)  # (H, W)
    return (values >= 0.5).float()[None, None]  # (1, 1, H, W)


def mask_to_latent(mask: PIL.Image.Image, latent_height: int, latent_width: int) -> torch.Tensor:
    """The mask channel of a 9-channel inpainting UNet: (1, 1, latent_height, latent_width) float32 of 0/1.

    The mask (at the image's pixel size) is binarised at 0.5 and scaled to the latent size by
    nearest-neighbour interpolation, as StableDiffusionInpaintPipeline does (1 = repaint).
    """
    return torch.nn.functional.interpolate(_binary_mask(mask), size=(latent_height, latent_width))


def masked_image(image: PIL.Image.Image, mask: PIL.Image.Image) -> torch.Tensor:
    """The image the inpainting UNet's masked-image latents come from: (1, 3, H, W) float32 in [-1, 1].

    image * (binary mask < 0.5) as diffusers computes it, so repainted pixels are exactly 0 (mid grey),
    a value 8-bit pixels cannot hold; hence a tensor, ready for the VAE encoder.
    """
    _same_size(image, mask)
    return image_to_tensor(image) * (_binary_mask(mask) < 0.5)  # (1, 3, H, W)
