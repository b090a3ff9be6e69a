"""The A1111 "parameters" text: exact layout, round trips, A1111's own regex, real A1111 texts, PNG/EXIF I/O."""

import io
import json
import os
import random
import re

import pytest
from PIL import Image

from sdtorch.errors import InvalidInputError, SdtorchError
from sdtorch.infotext import GenerationParams, format_infotext, parse_infotext, read_infotext, save_png

# Copied from AUTOMATIC1111 modules/infotext_utils.py (re_param_code), independent of our module's copy.
A1111_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(text: str) -> tuple[str, str, dict[str, str]]:
    """A1111's parse_generation_parameters, reduced to prompt, negative prompt and raw key/value strings."""
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = text.strip().split("\n")
    matches = A1111_RE.findall(lastline)
    if len(matches) < 3:
        lines.append(lastline)
        matches = []
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res = {}
    for k, v in matches:
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        res[k] = v
    return prompt, negative, res


# ---------------------------------------------------------------- writing

def test_layout_matches_a1111():
    p = GenerationParams("a cat in a hat", "blurry", seed=1, model_hash="6ce0161689",
                         model_name="v1-5-pruned-emaonly", version="v1.10.1")
    assert format_infotext(p) == (
        "a cat in a hat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
    )


def test_full_key_order_numbers_and_quoting():
    p = GenerationParams(
        "castle, sunset: golden hour", "", steps=30, sampler="Euler a", schedule="sgm_uniform", cfg_scale=7.5,
        seed=3141592653, width=768, height=512, model_hash="e6e99610c4", model_name="anything, v3",
        denoising_strength=0.55, clip_skip=2, hires_upscale=2.0, hires_steps=10, hires_upscaler="Latent",
        mask_blur=4, eta=0.67, version="v1.10.1",
        extra={"Lora hashes": "a: 1, b: 2", "VAE hash": "735e4c3a44", "RNG": "CPU", "ADetailer prompt": "x\ny"},
    )
    assert format_infotext(p) == (
        "castle, sunset: golden hour\n"  # no negative prompt line when it is empty
        "Steps: 30, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 7.5, Seed: 3141592653, "
        'Size: 768x512, Model hash: e6e99610c4, Model: "anything, v3", VAE hash: 735e4c3a44, '
        "Denoising strength: 0.55, Clip skip: 2, RNG: CPU, Hires upscale: 2, Hires steps: 10, "
        'Hires upscaler: Latent, Mask blur: 4, Eta: 0.67, Lora hashes: "a: 1, b: 2", '
        'ADetailer prompt: "x\\ny", Version: v1.10.1'
    )


def test_defaults_left_out():
    text = format_infotext(GenerationParams("p", clip_skip=1, seed=5, cfg_scale=7.0, hires_upscale=1.5))
    assert text == ("p\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, "
                    "Size: 512x512, Hires upscale: 1.5")


def test_bad_extra_keys_refused():
    with pytest.raises(InvalidInputError, match="repeats"):
        format_infotext(GenerationParams("p", extra={"Steps": "3"}))
    for key in ("a:b", "x", " lead", "trail ", "comma,key", ""):
        with pytest.raises(InvalidInputError, match="cannot be read back"):
            format_infotext(GenerationParams("p", extra={key: "1"}))


# ---------------------------------------------------------------- round trips

PROMPTS = [
    "a cat", "", "猫、日本語のテスト: 桜", "émoji 🐱🚀, naïve café", "line one\nline two, with comma\nline: three",
    "(masterpiece:1.2), [blurry], \\(escaped\\), BREAK\nsecond chunk", 'say "hello", world',
    "back\\slash \\n not newline",
    "key: value, other: thing, third: one",  # looks like a parameter line, but is never the last line
    "trailing quote\"", "a,b:c\n\nafter an empty line",
]
NEGATIVES = ["", "blurry", "lowres, bad anatomy: 1.2\nsecond negative line", "негатив, 负面"]
SCHEDULES = ["Automatic", "Karras", "Exponential", "Uniform", "SGM Uniform"]
SAMPLERS = ["DPM++ 2M", "Euler a", "Euler", "DDIM", "UniPC", "DPM++ 2M SDE", "LMS"]


def random_params(rng: random.Random) -> GenerationParams:
    maybe = lambda value: value if rng.random() < 0.5 else None  # noqa: E731
    extra = {}
    if rng.random() < 0.5:
        extra["Lora hashes"] = rng.choice(['"a: 1, b: 2"', "a: 1, b: 2", "detail: abc"])
    if rng.random() < 0.3:
        extra["Hires resize"] = "1024x768"
    if rng.random() < 0.3:
        extra["ADetailer prompt"] = rng.choice(PROMPTS[1:]) or "x"
    return GenerationParams(
        prompt=rng.choice(PROMPTS), negative_prompt=rng.choice(NEGATIVES), steps=rng.randint(1, 150),
        sampler=rng.choice(SAMPLERS), schedule=rng.choice(SCHEDULES),
        cfg_scale=rng.choice([1.0, 7.0, 7.5, 4.25, 12.0, 0.1]), seed=rng.randint(-1, 2**32 - 1),
        width=rng.choice([64, 512, 768]), height=rng.choice([64, 512, 1024]),
        model_hash=maybe(f"{rng.getrandbits(40):010x}"), model_name=maybe(rng.choice(["v1-5", "my model, v2: final"])),
        denoising_strength=maybe(rng.choice([0.75, 0.3, 1.0, 0.0])), clip_skip=rng.choice([1, 2, 3]),
        hires_upscale=maybe(rng.choice([2.0, 1.5])), hires_steps=maybe(rng.choice([0, 10])),
        hires_upscaler=maybe(rng.choice(["Latent", "Latent (nearest-exact)", "R-ESRGAN 4x+"])),
        mask_blur=maybe(4), eta=maybe(rng.choice([0.0, 0.67, 1.0])), version=maybe("v1.10.1"), extra=extra,
    )


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("negative", NEGATIVES)
def test_round_trip_prompts(prompt, negative):
    p = GenerationParams(prompt, negative, seed=42, hires_upscale=2.0, hires_steps=10, hires_upscaler="Latent",
                         denoising_strength=0.7)
    assert parse_infotext(format_infotext(p)) == p


def test_round_trip_many_combinations():
    rng = random.Random(1234)
    for _ in range(400):
        p = random_params(rng)
        text = format_infotext(p)
        assert parse_infotext(text) == p, text


def test_a1111_regex_reads_what_we_write():
    rng = random.Random(99)
    for _ in range(200):
        p = random_params(rng)
        text = format_infotext(p)
        prompt, negative, res = a1111_parse(text)
        assert len(A1111_RE.findall(text.split("\n")[-1])) >= 3
        assert (prompt, negative) == (p.prompt, p.negative_prompt)
        expected = {"Steps": str(p.steps), "Sampler": p.sampler, "Schedule type": p.schedule,
                    "CFG scale": f"{p.cfg_scale:g}", "Seed": str(p.seed), "Size": f"{p.width}x{p.height}"}
        optional = {"Model hash": p.model_hash, "Model": p.model_name, "Denoising strength": p.denoising_strength,
                    "Clip skip": p.clip_skip if p.clip_skip > 1 else None, "Hires upscale": p.hires_upscale,
                    "Hires steps": p.hires_steps, "Hires upscaler": p.hires_upscaler, "Mask blur": p.mask_blur,
                    "Eta": p.eta, "Version": p.version, **p.extra}
        expected.update({k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in optional.items() if v is not None})
        assert res == expected, text


def test_a1111_regex_on_a_fixed_text():
    p = GenerationParams("p", seed=7, width=768, height=512, clip_skip=2, model_hash="abc123", version="v1.10.1",
                         extra={"Lora hashes": "a: 1, b: 2"})
    _, _, res = a1111_parse(format_infotext(p))
    assert res == {"Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "7",
                   "Size": "768x512", "Model hash": "abc123", "Clip skip": "2", "Lora hashes": "a: 1, b: 2",
                   "Version": "v1.10.1"}


# ---------------------------------------------------------------- reading texts A1111 wrote

MODERN = (
    "masterpiece, best quality, 1girl, (red hair:1.2), <lora:detail:0.8>\n"
    "Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 2767081529, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.ckpt, "
    'Clip skip: 2, Lora hashes: "detail: 3a1b2c3d4e5f, style: 0f9e8d7c6b5a", TI hashes: "easynegative: c74b4e810b03", '
    "Version: v1.10.1"
)
LEGACY_HIRES = (
    "a photo of an astronaut riding a horse on mars, highly detailed\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 3141592653, Size: 768x512, Model hash: e6e99610c4, "
    "Model: anything-v3, Denoising strength: 0.55, Clip skip: 2, Hires upscale: 2, Hires steps: 10, "
    "Hires upscaler: Latent, Version: v1.3.0"
)
OLD = (
    "girl with an artist's beret, determined, blue eyes, desert scene\n"
    "Negative prompt: ugly, fat, obese, (((deformed))), [blurry]\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)
INPAINT = (
    "a red rose\nin a glass vase\n"
    "Negative prompt: wilted\nbrown leaves\n"
    "Steps: 25, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 12, Size: 512x512, "
    "Model hash: 3e16efc8b8, Model: sd-v1-5-inpainting, Denoising strength: 0.75, Mask blur: 4, "
    "Inpaint area: Only masked, Masked area padding: 32, Version: v1.9.4"
)
ADETAILER = (
    "portrait\n"
    'Steps: 20, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 1, Size: 512x512, ADetailer model: face_yolov8n.pt, '
    'ADetailer prompt: "smiling,\\nhappy \\"face\\"", ADetailer version: 23.11.1, Version: v1.6.0'
)


def test_parse_modern_text():
    p = parse_infotext(MODERN)
    assert p == GenerationParams(
        prompt="masterpiece, best quality, 1girl, (red hair:1.2), <lora:detail:0.8>",
        negative_prompt="lowres, bad anatomy, (worst quality:1.4)", steps=28, sampler="DPM++ 2M", schedule="Karras",
        cfg_scale=6.5, seed=2767081529, width=512, height=768, model_hash="6ce0161689",
        model_name="v1-5-pruned-emaonly", clip_skip=2, version="v1.10.1",
        extra={"VAE hash": "735e4c3a44", "VAE": "vae-ft-mse-840000-ema-pruned.ckpt",
               "Lora hashes": "detail: 3a1b2c3d4e5f, style: 0f9e8d7c6b5a", "TI hashes": "easynegative: c74b4e810b03"},
    )
    assert list(p.extra) == ["VAE hash", "VAE", "Lora hashes", "TI hashes"]  # order kept
    assert format_infotext(p) == MODERN  # written back byte for byte, in A1111's key order


def test_parse_legacy_sampler_with_hires():
    p = parse_infotext(LEGACY_HIRES)
    assert (p.sampler, p.schedule) == ("DPM++ 2M", "Karras")
    assert (p.width, p.height, p.clip_skip, p.cfg_scale, p.seed) == (768, 512, 2, 7.5, 3141592653)
    assert (p.hires_upscale, p.hires_steps, p.hires_upscaler, p.denoising_strength) == (2.0, 10, "Latent", 0.55)
    assert p.negative_prompt == "" and p.version == "v1.3.0" and p.extra == {}
    assert p.prompt == "a photo of an astronaut riding a horse on mars, highly detailed"


def test_parse_old_text_defaults():
    p = parse_infotext(OLD)
    assert (p.sampler, p.schedule, p.clip_skip, p.model_hash) == ("Euler a", "Automatic", 1, "45dee52b")
    assert p.negative_prompt == "ugly, fat, obese, (((deformed))), [blurry]"
    assert (p.model_name, p.denoising_strength, p.hires_upscale, p.version) == (None, None, None, None)


def test_parse_inpaint_multiline():
    p = parse_infotext(INPAINT)
    assert p.prompt == "a red rose\nin a glass vase"
    assert p.negative_prompt == "wilted\nbrown leaves"
    assert (p.schedule, p.denoising_strength, p.mask_blur) == ("Automatic", 0.75, 4)
    assert p.extra == {"Inpaint area": "Only masked", "Masked area padding": "32"}
    assert format_infotext(p) == INPAINT


def test_parse_quoted_escapes_and_other_legacy_forms():
    p = parse_infotext(ADETAILER)
    assert (p.sampler, p.schedule) == ("DPM++ SDE", "Karras")
    assert p.extra["ADetailer prompt"] == 'smiling,\nhappy "face"'
    for sampler, expected in [("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
                              ("DPM2 a Karras", ("DPM2 a", "Karras")), ("Euler SGM Uniform", ("Euler", "SGM Uniform")),
                              ("Euler a", ("Euler a", "Automatic")), ("Karras", ("Karras", "Automatic"))]:
        q = parse_infotext(f"x\nSteps: 5, Sampler: {sampler}, CFG scale: 7, Seed: 1")
        assert (q.sampler, q.schedule) == expected
    # an explicit Schedule type keeps the sampler name whole
    q = parse_infotext("x\nSteps: 5, Sampler: Euler a, Schedule type: karras, CFG scale: 7")
    assert (q.sampler, q.schedule) == ("Euler a", "Karras")


def test_windows_line_ends_and_indented_lines():
    text = OLD.replace("\n", "\r\n").replace("Negative", "  Negative") + "\r\n"
    assert parse_infotext(text) == parse_infotext(OLD)
    assert parse_infotext("  two\n   lines \nSteps: 5, Sampler: Euler, CFG scale: 7").prompt == "two\nlines"


def test_text_without_parameter_line_is_all_prompt():
    p = parse_infotext("just a prompt, with: one colon\nNegative prompt: bad")
    assert (p.prompt, p.negative_prompt, p.steps, p.schedule) == ("just a prompt, with: one colon", "bad", 20,
                                                                  "Automatic")


def test_parse_bad_numbers():
    with pytest.raises(InvalidInputError, match="Steps 'many'"):
        parse_infotext("x\nSteps: many, Sampler: Euler, CFG scale: 7")
    with pytest.raises(InvalidInputError, match="Size"):
        parse_infotext("x\nSteps: 5, Sampler: Euler, CFG scale: 7, Size: 512")
    with pytest.raises(InvalidInputError, match="CFG scale"):
        parse_infotext("x\nSteps: 5, Sampler: Euler, CFG scale: high")
    with pytest.raises(InvalidInputError):
        parse_infotext(None)


# ---------------------------------------------------------------- image files

def _image(seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (16, 8), bytes(rng.randrange(256) for _ in range(16 * 8 * 3)))


@pytest.mark.parametrize("text,chunk", [(LEGACY_HIRES, b"tEXt"), (MODERN + "\n猫 🐱", b"iTXt")])
def test_png_round_trip(tmp_path, text, chunk):
    image = _image()
    path = save_png(image, tmp_path / "sub" / "out.png", text)
    assert path == tmp_path / "sub" / "out.png"
    assert read_infotext(path) == text
    assert read_infotext(str(path)) == text
    assert read_infotext(path.read_bytes()) == text
    with open(path, "rb") as f:
        assert read_infotext(f) == text
    data = path.read_bytes()
    assert chunk + b"parameters\0" in data  # the chunk type Pillow picks: tEXt for latin-1, iTXt otherwise
    with Image.open(path) as reread:
        assert reread.info["parameters"] == text
        assert read_infotext(reread) == text
        assert reread.tobytes() == image.tobytes()
    assert os.listdir(path.parent) == ["out.png"]


def test_png_overwrite_and_empty_text(tmp_path):
    path = tmp_path / "a.png"
    save_png(_image(), path, "first\nSteps: 1, Sampler: Euler, CFG scale: 7")
    save_png(_image(1), path, "")
    assert read_infotext(path) is None  # no chunk written for an empty text
    with Image.open(path) as reread:
        assert reread.tobytes() == _image(1).tobytes()


def test_text_chunk_after_pixel_data(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "late\nSteps: 1, Sampler: Euler, CFG scale: 7", zip=True)
    path = tmp_path / "late.png"
    _image().save(path, pnginfo=info)
    data = path.read_bytes()  # move the zTXt chunk behind IDAT: readers must still find it
    start = data.index(b"zTXt") - 4
    length = int.from_bytes(data[start:start + 4], "big") + 12
    chunk, rest = data[start:start + length], data[:start] + data[start + length:]
    iend = rest.index(b"IEND") - 4
    path.write_bytes(rest[:iend] + chunk + rest[iend:])
    assert rest.index(b"IDAT") < iend
    assert read_infotext(path) == "late\nSteps: 1, Sampler: Euler, CFG scale: 7"


def _exif_with_comment(comment: bytes, little_endian: bool = False) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    if little_endian:
        exif.endian = "<"
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("encoding", ["unicode-be", "unicode-le", "ascii", "undefined"])
def test_exif_user_comment(tmp_path, fmt, encoding):
    text = MODERN if encoding in ("ascii", "undefined") else MODERN + "\n猫 🐱 ñ"
    prefix, codec = {  # piexif's UserComment.dump(..., encoding="unicode") is the first, as A1111 writes it
        "unicode-be": (b"UNICODE\0", "utf-16-be"), "unicode-le": (b"UNICODE\0", "utf-16-le"),
        "ascii": (b"ASCII\0\0\0", "ascii"), "undefined": (b"\0" * 8, "utf-8"),
    }[encoding]
    comment = prefix + text.encode(codec)
    path = tmp_path / f"img.{fmt.lower()}"
    _image().save(path, format=fmt, exif=_exif_with_comment(comment, little_endian=encoding == "unicode-le"))
    assert read_infotext(path) == text


def test_images_without_text(tmp_path):
    _image().save(tmp_path / "plain.png")
    _image().save(tmp_path / "plain.jpg")
    assert read_infotext(tmp_path / "plain.png") is None
    assert read_infotext(tmp_path / "plain.jpg") is None
    assert read_infotext(_image()) is None


def test_unreadable_sources(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        read_infotext(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="folder"):
        read_infotext(tmp_path)
    (tmp_path / "notes.txt").write_text("Steps: 20, Sampler: Euler, CFG scale: 7")
    with pytest.raises(InvalidInputError, match="not an image"):
        read_infotext(tmp_path / "notes.txt")
    with pytest.raises(InvalidInputError, match="not an image"):
        read_infotext(b"\x89PNG garbage")
    save_png(_image(), tmp_path / "cut.png", "late")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    with pytest.raises(InvalidInputError, match="cut.png"):
        read_infotext(tmp_path / "cut.png")
    with pytest.raises(InvalidInputError, match="PIL image"):
        save_png(io.BytesIO(), tmp_path / "x.png", "t")


def test_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.png"
    save_png(_image(), path, "original")
    before = path.read_bytes()

    def disk_full(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(SdtorchError, match="No space left"):
        save_png(_image(1), path, "new text")
    assert os.listdir(tmp_path) == ["keep.png"] and path.read_bytes() == before

    def interrupted(self, fp, *args, **kwargs):
        open(fp, "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(_image(1), tmp_path / "new.png", "t")
    assert os.listdir(tmp_path) == ["keep.png"]

    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(SdtorchError, match="Permission denied"):
        save_png(_image(1), path, "new text")
    assert os.listdir(tmp_path) == ["keep.png"] and path.read_bytes() == before
