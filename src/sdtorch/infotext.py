"""The AUTOMATIC1111 "parameters" text: write it, parse it, and carry it inside image files.

The text has the prompt (any number of lines), an optional "Negative prompt: ..." line, and one last
line of `Key: value` pairs:

    a cat in a hat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Version: v1.10.1

Writing follows A1111's `create_infotext` (key order, which keys are left out, JSON-quoting of values
that hold `,` `:` or a newline); reading follows its `parse_generation_parameters` (the last line counts
as the parameter line only when its regex finds at least 3 pairs; "Sampler: DPM++ 2M Karras" from
before v1.9 names the schedule inside the sampler). PNG files keep the text in a tEXt/iTXt chunk named
"parameters"; A1111's JPEG and WEBP files keep it in the EXIF UserComment, which is read here too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .checkpoints.io import atomic_write
from .errors import InvalidInputError
from .request import BOOLEAN_LABELS, ControlNetUnit, GenerationRequest, HiresFix, Inpainting, IPAdapterUnit, fields_of

# A1111's parameter-line regex (modules/infotext_utils.py), byte for byte: readers everywhere use it
PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
KEY_RE = re.compile(r"\w[\w \-/]*[\w\-/]")  # a key the parameter regex reads back whole
NEGATIVE_PREFIX = "Negative prompt:"

# A1111's schedulers (modules/sd_schedulers.py): name -> label; the label is what infotexts hold
SCHEDULE_LABELS = {
    "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM", "beta": "Beta",
}
_SCHEDULE_SPELLINGS = {  # every spelling A1111 cuts off the end of a legacy sampler name
    **SCHEDULE_LABELS, **{label: label for label in SCHEDULE_LABELS.values()}, "SGMUniform": "SGM Uniform"
}

# Keys A1111 writes at fixed places before its free-form extra parameters, and those it writes after them
_HEAD_KEYS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
_TAIL_KEYS = ("Version", "User")


@dataclass
class Infotext:
    """What an infotext says: the request it describes (the fields the text holds; the others keep the
    request's defaults, `None` meaning the model's own), the model it names, and every other key as text."""

    request: GenerationRequest
    model_hash: str | None = None
    model_name: str | None = None
    version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _keyed_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    return [(f, hint) for f, hint in fields_of(cls) if f.metadata.get("key")]


_REQUEST_KEYS = {f.metadata["key"] for cls in (GenerationRequest, HiresFix, Inpainting) for f, _ in _keyed_fields(cls)}
HIRES_RESIZE = "Hires resize"  # the hires fix's target size, "WxH", as A1111 writes it
SEED_RESIZE = "Seed resize from"  # A1111's seed resize, "WxH"
SCHEDULE_KEYS = ("Schedule type", "Hires schedule type")  # written as A1111's labels
_KEYS = _REQUEST_KEYS | {"Size", HIRES_RESIZE, SEED_RESIZE, "Model hash", "Model", "Version"}  # not for `extra`


# The A1111 ControlNet extension's keys "ControlNet 0", "ControlNet 1"...: one a unit, its value "Module: canny,
# Model: name [hash], Weight: 1.0, ..." (these fields in this order, names capitalised word by word, str() values;
# a unit whose values hold "," or ":" is not written, as the extension writes it empty)
CONTROLNET_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                     "guidance_start", "guidance_end", "pixel_perfect", "control_mode")
CONTROLNET_KEY = re.compile(r"ControlNet (\d+)")
IP_ADAPTER_MODULE = "ip-adapter"  # the extension's IP-Adapter units: modules "ip-adapter_clip_h", ... (image prompts)
RESIZE_LABELS = {"just resize": "Just Resize", "crop and resize": "Crop and Resize", "resize and fill": "Resize and Fill"}


def format_controlnet_unit(unit: ControlNetUnit) -> str:
    """A unit's text as the extension writes it (sdtorch adds "Guess Mode: True" for diffusers' guess mode)."""
    values = {name: getattr(unit, name) for name in CONTROLNET_FIELDS}
    values["resize_mode"] = RESIZE_LABELS[unit.resize_mode.lower()]
    if unit.guess_mode:
        values["guess_mode"] = True
    text = {" ".join(w.capitalize() for w in name.split("_")): str(value) for name, value in values.items()}
    if any("," in v or ":" in v for v in text.values()):
        return ""
    return ", ".join(f"{key}: {value}" for key, value in text.items())


def parse_controlnet_unit(text: str) -> ControlNetUnit:
    """A unit from the extension's text (no image; the model as named there); keys it does not know are skipped,
    as the extension skips them."""
    hints = {f.name: hint for f, hint in fields_of(ControlNetUnit)}
    fields: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = item.strip().partition(": ")
        name = "_".join(w.lower() for w in key.split(" "))
        if name not in hints or name in ("image", "mask"):
            continue
        kinds = [t for t in typing.get_args(hints[name]) or (hints[name],) if t in (bool, int, float)]
        try:
            fields[name] = (value == "True" if kinds[0] is bool else kinds[0](float(value)) if kinds[0] is int
                            else kinds[0](value)) if kinds else value
        except ValueError:
            raise InvalidInputError(f"infotext: ControlNet {key} {value!r} is not a valid {kinds[0].__name__}") from None
    return ControlNetUnit(**fields)


def _applies(request: GenerationRequest) -> dict[str, object]:
    """The objects whose keyed fields this request's infotext holds: the hires fix when on, the inpainting
    settings when there is a mask, and the request itself (last: its free keys, such as Eta, follow theirs as in
    A1111's texts). "Denoising strength" belongs to img2img, else to the hires fix."""
    owners: dict[str, object] = {}
    if request.hires is not None:
        owners["hires"] = request.hires
    if request.mask is not None:
        owners["inpaint"] = request.inpaint
    owners["request"] = request
    return owners


def _size(text: str, key: str) -> tuple[int, int]:
    match = SIZE_RE.match(text)
    if match is None:
        raise InvalidInputError(f"infotext: {key} {text!r} is not WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def schedule_label(name: str) -> str:
    """A1111's label for a schedule name in any spelling ("karras", "sgm_uniform" -> "Karras", "SGM Uniform")."""
    key = "_".join(name.lower().replace("_", " ").split())
    return SCHEDULE_LABELS.get("sgm_uniform" if key == "sgmuniform" else key, name)


def _text(value: object) -> str:
    """A value as A1111 prints it, except that whole floats lose their ".0" (CFG scale 7, Hires upscale 2)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(value: str) -> str:
    """JSON-quote what the parameter regex would cut or mangle (A1111 quotes `,` `:` and newlines)."""
    if any(c in value for c in ",:\n") or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _position(key: str) -> tuple[int, int]:
    """Sort key giving A1111's order: fixed keys first, extra parameters in their own order, Version last."""
    if key in _HEAD_KEYS:
        return 0, _HEAD_KEYS.index(key)
    if key in _TAIL_KEYS:
        return 2, _TAIL_KEYS.index(key)
    return 1, 0


def _value(f: dataclasses.Field, value: object) -> object:
    """A field's value as the infotext holds it (booleans as A1111's labels)."""
    if isinstance(value, bool):
        return BOOLEAN_LABELS[f.metadata["key"]][value]
    return value


def format_infotext(
    request: GenerationRequest, *, model_hash: str | None = None, model_name: str | None = None,
    version: str | None = None, extra: dict[str, object] | None = None,
) -> str:
    """The A1111 "parameters" text of one image (what A1111 shows under an image and stores in its PNG).

    `request` is resolved for that image: one prompt, its seed, size and CFG filled in. A keyed field is written
    when its value is not the default (or always, for the keys A1111 always writes); the hires fix's keys only
    when it is on, the inpainting keys only with a mask, "Refiner switch at" only with a "Refiner" (generation
    writes the refiner that ran as A1111 does: "name [hash]").
    """
    values: dict[str, object] = {}
    if request.width is not None and request.height is not None:
        values["Size"] = f"{request.width}x{request.height}"
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        values[SEED_RESIZE] = f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
    for owner, obj in _applies(request).items():
        for f, _ in _keyed_fields(type(obj)):
            value, key = getattr(obj, f.name), f.metadata["key"]
            if key == "Denoising strength" and (owner == "hires") == (request.init_image is not None):
                continue  # img2img's strength, or the hires fix's in txt2img
            if key == "Masked area padding" and not request.inpaint.inpaint_full_res:
                continue
            if key in ("Variation seed", "Variation seed strength") and not request.subseed_strength:
                continue  # A1111 writes the variation seed only when it is used
            if key == "Refiner switch at":  # A1111 writes it, default or not, with the refiner that ran
                if request.refiner_checkpoint is not None:
                    values[key] = value
                continue
            if key == "Hires upscale" and (obj.hr_resize_x or obj.hr_resize_y):  # the target size instead
                values[HIRES_RESIZE] = f"{obj.hr_resize_x}x{obj.hr_resize_y}"
                continue
            if value is None or (value == f.default and not f.metadata["always"]):
                continue
            values[key] = schedule_label(value) if key in SCHEDULE_KEYS else _value(f, value)
    values |= {f"ControlNet {i}": format_controlnet_unit(unit) for i, unit in enumerate(request.controlnet)}
    values |= {"Model hash": model_hash, "Model": model_name, "Version": version}
    for key, value in (extra or {}).items():
        if key in values or key in _KEYS or CONTROLNET_KEY.fullmatch(key):
            raise InvalidInputError(f"infotext extra key {key!r} is a request field's key; set the field")
        if not KEY_RE.fullmatch(key):
            raise InvalidInputError(f"infotext key {key!r} cannot be read back: use letters, digits, spaces, - or /")
        values[key] = value
    line = format_items({key: values[key] for key in sorted(values, key=_position)})
    prompt = request.prompt if isinstance(request.prompt, str) else "\n".join(request.prompt)
    negative = request.negative_prompt if isinstance(request.negative_prompt, str) else "\n".join(request.negative_prompt)
    negative_line = f"\n{NEGATIVE_PREFIX} {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{line}".strip()


def format_items(items: dict[str, object]) -> str:
    """"key: value, ..." in the given order, values as A1111 prints them (quoted where the parameter regex would cut
    them); None and empty values left out."""
    written = {key: _text(value) for key, value in items.items() if value is not None and _text(value) != ""}
    return ", ".join(f"{key}: {_quote(value)}" for key, value in written.items())


def _append_line(text: str, line: str) -> str:
    return line if text == "" else f"{text}\n{line}"


def _convert(f: dataclasses.Field, hint: Any, value: str) -> object:
    """An infotext value as the field's type; a value that does not fit raises InvalidInputError."""
    key = f.metadata["key"]
    if key in BOOLEAN_LABELS:
        return value == BOOLEAN_LABELS[key][1]
    kinds = [t for t in typing.get_args(hint) or (hint,) if t in (int, float, str)]
    kind = kinds[0] if kinds else str
    try:
        return kind(value)
    except ValueError:
        raise InvalidInputError(f"infotext: {key} {value!r} is not a valid {kind.__name__}") from None


def split_legacy_sampler(sampler: str) -> tuple[str, str | None]:
    """("DPM++ 2M", "Karras") for the pre-v1.9 "DPM++ 2M Karras"; (sampler, None) when no schedule is named."""
    for spelling in sorted(_SCHEDULE_SPELLINGS, key=len, reverse=True):  # "SGM Uniform" before "Uniform"
        if sampler.endswith(" " + spelling) and sampler[: -len(spelling) - 1].strip():
            return sampler[: -len(spelling) - 1], _SCHEDULE_SPELLINGS[spelling]
    return sampler, None


def _split(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an infotext, by A1111's rules (values unquoted, empty ones dropped)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"infotext must be a string, not {type(text).__name__}")
    *lines, last = text.strip().split("\n")
    pairs = PARAM_RE.findall(last)
    if len(pairs) < 3:  # not a parameter line: it belongs to the prompt
        lines.append(last)
        pairs = []
    prompt = negative = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        if in_negative:
            negative = _append_line(negative, line)
        else:
            prompt = _append_line(prompt, line)
    return prompt, negative, {key: _unquote(raw) for key, raw in pairs if raw}  # A1111 drops keys with empty values


def infotext_items(text: str) -> dict[str, str]:
    """An infotext as the flat dict of A1111's `parse_generation_parameters` (its API's png-info `parameters`):
    "Prompt", "Negative prompt" and every key as text, a "WxH" value split into "Key-1" and "Key-2"."""
    prompt, negative, values = _split(text)
    items = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in values.items():
        size = SIZE_RE.match(value)
        if size is not None:
            items[f"{key}-1"], items[f"{key}-2"] = size.group(1), size.group(2)
        else:
            items[key] = value
    return items


def parse_infotext(text: str) -> Infotext:
    """Read an A1111 "parameters" text, by A1111's rules, into the request it describes.

    Keys with no request field go to `extra`; a missing "Schedule type" means "Automatic" unless the sampler
    name carries one (the legacy form). Hires keys turn the hires fix on; "Denoising strength" is then the
    second pass's. A value that should be a number and is not raises InvalidInputError.
    """
    prompt, negative, values = _split(text)
    found: dict[str, dict[str, object]] = {"request": {}, "hires": {}, "inpaint": {}}
    hires_keys = {f.metadata["key"] for f, _ in _keyed_fields(HiresFix)} - {"Denoising strength"} | {HIRES_RESIZE}
    strength_owner = "hires" if hires_keys & values.keys() else "request"
    for owner, cls in (("request", GenerationRequest), ("hires", HiresFix), ("inpaint", Inpainting)):
        for f, hint in _keyed_fields(cls):
            key = f.metadata["key"]
            if key in values and (key != "Denoising strength" or owner == strength_owner):
                found[owner][f.name] = _convert(f, hint, values[key])
    for key in _REQUEST_KEYS:
        values.pop(key, None)
    fields = found["request"]
    if "Size" in values:
        fields["width"], fields["height"] = _size(values.pop("Size"), "Size")
    if HIRES_RESIZE in values:
        found["hires"]["hr_resize_x"], found["hires"]["hr_resize_y"] = _size(values.pop(HIRES_RESIZE), HIRES_RESIZE)
    if SEED_RESIZE in values:
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = _size(values.pop(SEED_RESIZE), SEED_RESIZE)
    if "scheduler" in fields:
        fields["scheduler"] = schedule_label(fields["scheduler"])
    elif "sampler_name" in fields:
        fields["sampler_name"], legacy = split_legacy_sampler(fields["sampler_name"])
        fields["scheduler"] = legacy or "Automatic"
    if found["hires"]:
        fields["hires"] = HiresFix(**found["hires"])
    if found["inpaint"]:
        fields["inpaint"] = Inpainting(**found["inpaint"])
    keys = sorted((int(m.group(1)), key) for key in values if (m := CONTROLNET_KEY.fullmatch(key)))
    units = [parse_controlnet_unit(values.pop(key)) for _, key in keys]
    controls = [unit for unit in units if not unit.module.startswith(IP_ADAPTER_MODULE)]
    images = [IPAdapterUnit(model=unit.model, weight=unit.weight) for unit in units if unit not in controls]
    if controls:
        fields["controlnet"] = controls
    if images:  # the extension's IP-Adapter units: image prompts
        fields["ip_adapter"] = images
    meta = {name: values.pop(key, None) for name, key in (("model_hash", "Model hash"), ("model_name", "Model"),
                                                            ("version", "Version"))}
    return Infotext(GenerationRequest(prompt=prompt, negative_prompt=negative, **fields), extra=values, **meta)


def save_png(image: Image.Image, path: str | os.PathLike, infotext: str) -> Path:
    """Write `image` as a PNG holding `infotext` in its "parameters" chunk; atomically (temp file + rename).

    Latin-1 text goes in a tEXt chunk, anything else in an iTXt chunk (UTF-8), as A1111's Pillow does.
    A failed write leaves no temp file behind and `path` untouched.
    """
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"save_png needs a PIL image, not {type(image).__name__}")
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=png_info(infotext)))
    return path


def png_info(infotext: str, postprocessing: str = "") -> PngImagePlugin.PngInfo:
    """The PNG text chunks of an image with `infotext` and A1111's Extras `postprocessing` text (each left out when
    empty): `image.save(f, "PNG", pnginfo=...)`."""
    chunks = PngImagePlugin.PngInfo()
    for name, text in (("parameters", infotext), ("postprocessing", postprocessing)):
        if text:
            chunks.add_text(name, text)
    return chunks


_USER_COMMENT_ENCODINGS = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"\0" * 8: "utf-8"}


def _decode_user_comment(raw: bytes) -> str:
    """EXIF UserComment: an 8-byte character-code prefix, then the text."""
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        # piexif (A1111) writes big-endian; some tools write little-endian. Mostly-ASCII text puts its
        # zero bytes first in big-endian.
        big = body[0::2].count(0) >= body[1::2].count(0)
        return body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    if prefix in _USER_COMMENT_ENCODINGS:
        return body.decode(_USER_COMMENT_ENCODINGS[prefix], errors="replace").rstrip("\0")
    return raw.decode("utf-8", errors="ignore")  # no known prefix: A1111 reads the bytes as UTF-8


def _exif_user_comment(image: Image.Image) -> str | None:
    try:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD -> UserComment
    except (OSError, ValueError, SyntaxError, struct.error):
        return None  # unreadable EXIF: no infotext there
    if isinstance(raw, str):
        return raw
    return _decode_user_comment(raw) if raw else None


def _infotext_of(image: Image.Image) -> str | None:
    text = image.info.get("parameters")
    if text is None and isinstance(image, PngImagePlugin.PngImageFile):
        text = image.text.get("parameters")  # also finds text chunks written after the pixel data
    if text is None:
        text = _exif_user_comment(image)
    return str(text) if text else None


def read_infotext(source: str | os.PathLike | bytes | IO[bytes] | Image.Image) -> str | None:
    """The "parameters" text of an image (a path, encoded bytes, a binary file or an opened PIL image).

    Reads the PNG "parameters" chunk, else the EXIF UserComment (A1111's JPEG/WEBP files). None when
    the image has neither; InvalidInputError when the source is not a readable image.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the image data"
    try:
        if isinstance(source, Image.Image):
            return _infotext_of(source)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return _infotext_of(image)
    except FileNotFoundError:
        raise InvalidInputError(f"cannot read {name}: no such file") from None
    except IsADirectoryError:
        raise InvalidInputError(f"cannot read {name}: it is a folder, not an image") from None
    except UnidentifiedImageError:
        raise InvalidInputError(f"cannot read {name}: not an image file Pillow recognises") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInputError(f"cannot read {name}: corrupt or truncated image ({e})") from None
