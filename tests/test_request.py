"""The generation request through its doors: `pipe(**settings)` and `sdtorch generate` flags.

Bad values and requests over the limits are refused, naming the field (and the limit), before any work: the
CLI never loads the model and the API never runs the UNet. Raising a limit lets the same request through.
`--from image.png` re-creates an image; warnings come back with the result; text from files is printed escaped;
Ctrl-C leaves no file behind. Everything runs on the built-in model (64 px, 4 text-encoder layers, CFG 4).
"""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sdtorch
import sdtorch.checkpoints.loading
import sdtorch.outputs
from sdtorch.cli import main
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import format_infotext, parse_infotext, read_infotext, save_png
from sdtorch.models.vae import AutoencoderKL
from sdtorch.request import GenerationRequest, HiresFix, Inpainting, Limits

pytestmark = pytest.mark.usefixtures("one_thread")


class Reached(Exception):
    """Raised by a stand-in UNet: the request passed every check and generation began."""


class StopUNet(nn.Module):
    """A UNet that raises `error` when called (it has one parameter: generation reads its dtype and device)."""

    def __init__(self, error: type[BaseException]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.error = error

    def forward(self, *args, **kwargs):
        raise self.error("the UNet ran")


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load()


@pytest.fixture
def fresh(pipe, monkeypatch):
    """The built-in pipeline with the default limits (restored after the test)."""
    monkeypatch.setattr(pipe, "limits", Limits())
    return pipe


@pytest.fixture
def guarded(fresh, monkeypatch):
    """The built-in pipeline whose UNet raises Reached."""
    monkeypatch.setattr(fresh, "unet", StopUNet(Reached))
    return fresh


@pytest.fixture
def no_load(monkeypatch):
    """The CLI must refuse before loading any model."""
    def load(*args, **kwargs):
        pytest.fail("the model was loaded for a request that should have been refused first")

    monkeypatch.setattr(sdtorch.checkpoints.loading, "load", load)


def use_pipeline(monkeypatch, pipeline) -> None:
    """`sdtorch generate` gets `pipeline` instead of loading the built-in model again."""
    monkeypatch.setattr(sdtorch.checkpoints.loading, "load", lambda *args, **kwargs: pipeline)


def square(value: int = 0, size: int = 64, mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, (size, size), value)
    img.paste(255 if mode == "L" else (200, 30, 30), (16, 16, 48, 48))
    return img


def images_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


def generate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *phrases: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtorch: error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0]
    return lines[0]


# ---- bad values and limits: (id, pipe keywords, CLI flags, phrases the message holds, limits that let it through)

BAD_VALUES = [
    ("steps=0", dict(steps=0), ["--steps", "0"], ["steps 0", ">= 1"]),
    ("width=0", dict(width=0), ["--width", "0"], ["width 0", ">= 8"]),
    ("clip_skip=0", dict(clip_skip=0), ["--clip-skip", "0"], ["clip_skip 0", ">= 1"]),
    ("height=60", dict(height=60), ["--height", "60"], ["height 60", "multiple of 8"]),
    ("cfg=nan", dict(cfg_scale=math.nan), ["--cfg", "nan"], ["cfg_scale nan", "finite"]),
    ("cfg=inf", dict(cfg_scale=math.inf), ["--cfg", "inf"], ["cfg_scale inf", "finite"]),
    ("cfg=-1", dict(guidance_scale=-1.0), ["--cfg", "-1"], ["cfg_scale -1", ">= 0"]),
    ("denoise=nan", dict(denoising_strength=math.nan), ["--strength", "nan"], ["denoising_strength nan", "finite"]),
    ("strength=1.5", dict(strength=1.5), ["--strength", "1.5"], ["denoising_strength 1.5", "<= 1"]),
    ("strength=0", dict(strength=0.0), ["--strength", "0"], ["denoising_strength 0", "> 0"]),
    ("hires-denoise=nan", dict(enable_hr=True, hr_denoising_strength=math.nan), ["--hires-denoise", "nan"],
     ["hr_denoising_strength nan", "finite"]),
    ("seed=2**32", dict(seed=2**32), ["--seed", str(2**32)], ["seed 4294967296", "4294967295"]),
    ("seed=-2", dict(seed=-2), ["--seed", "-2"], ["seed -2"]),
    ("sampler", dict(sampler_name="Euler z"), ["--sampler", "Euler z"], ["sampler_name 'Euler z'", "Euler a"]),
    ("schedule", dict(scheduler="Karas"), ["--schedule", "Karas"], ["scheduler 'Karas'", "did you mean 'Karras'"]),
]

LIMITS = [
    ("width=4096", dict(width=4096), ["--width", "4096"], ["width 4096", "max_width=2048"], dict(max_width=4096)),
    ("steps=1000", dict(steps=1000), ["--steps", "1000"], ["steps 1000", "max_steps=150"], dict(max_steps=1000)),
    ("batch=100", dict(batch_size=100), ["--batch", "100"], ["batch_size 100", "max_batch=64"], dict(max_batch=100)),
    ("hr_scale=8", dict(enable_hr=True, hr_scale=8), ["--hires-scale", "8"], ["hr_scale 8", "max_hr_scale=4"],
     dict(max_hr_scale=8)),
    ("mask_blur=1000", dict(mask_blur=1000), ["--mask-blur", "1000"], ["mask_blur 1000", "max_mask_blur=64"],
     dict(max_mask_blur=1000)),
    ("hires-steps=200", dict(enable_hr=True, hr_second_pass_steps=200), ["--hires-steps", "200"],
     ["hr_second_pass_steps 200", "max_steps=150"], dict(max_steps=200)),
]

# limits checked against the resolved size: the model's native size, or the hires fix's target
PIXELS = [
    ("pixels", dict(width=2048, height=2048, batch_size=2), ["--width", "2048", "--height", "2048", "--batch", "2"],
     ["2048x2048 x 2 image(s)", "8,388,608 pixels", "max_pixels=4,194,304"], dict(max_pixels=2048 * 2048 * 2)),
    ("hires-pixels", dict(width=2048, height=2048, enable_hr=True), ["--width", "2048", "--height", "2048", "--hires"],
     ["4096x4096", "max_pixels=4,194,304"], dict(max_pixels=4096 * 4096, max_width=4096, max_height=4096)),
]


def _ids(cases):
    return [case[0] for case in cases]


@pytest.mark.parametrize(("name", "settings", "flags", "phrases"), BAD_VALUES, ids=_ids(BAD_VALUES))
def test_bad_values_refused_by_the_api(guarded, name, settings, flags, phrases):
    with pytest.raises(InvalidInputError) as error:
        guarded("a red circle", **settings)
    for phrase in phrases:
        assert phrase in str(error.value)


@pytest.mark.parametrize(("name", "settings", "flags", "phrases"), BAD_VALUES, ids=_ids(BAD_VALUES))
def test_bad_values_refused_by_the_cli(no_load, tmp_path, capsys, name, settings, flags, phrases):
    code, out, err = generate(capsys, "a red circle", *flags, "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert_one_error_line(err, *phrases)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "settings", "flags", "phrases", "raised"), LIMITS + PIXELS, ids=_ids(LIMITS + PIXELS))
def test_limits_refused_and_raised_in_the_api(guarded, name, settings, flags, phrases, raised):
    if "mask_blur" in settings:
        settings = dict(settings, image=square(), mask_image=square(mode="L"))
    with pytest.raises(InvalidInputError) as error:
        guarded("a red circle", **settings)
    for phrase in phrases:
        assert phrase in str(error.value)
    guarded.limits = Limits(**raised)
    with pytest.raises(Reached):  # every check passed; the request went on to the UNet
        guarded("a red circle", **settings)


@pytest.mark.parametrize(("name", "settings", "flags", "phrases", "raised"), LIMITS, ids=_ids(LIMITS))
def test_limits_refused_by_the_cli_before_loading(no_load, tmp_path, capsys, name, settings, flags, phrases, raised):
    code, out, err = generate(capsys, "a red circle", *flags, "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert_one_error_line(err, *phrases, "--limit")  # the message says how to raise it
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "settings", "flags", "phrases", "raised"), LIMITS + PIXELS, ids=_ids(LIMITS + PIXELS))
def test_limits_raised_with_the_cli_flag(guarded, monkeypatch, tmp_path, capsys, name, settings, flags, phrases,
                                        raised):
    if "mask_blur" in settings:
        square().save(tmp_path / "image.png")
        square(mode="L").save(tmp_path / "mask.png")
        flags = [*flags, "--init-image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png")]
    use_pipeline(monkeypatch, guarded)
    limits = [arg for key, value in raised.items() for arg in ("--limit", f"{key}={value}")]
    with pytest.raises(Reached):
        main(["generate", "a red circle", *flags, *limits, "--out", str(tmp_path / "out"), "--quiet"])
    assert images_in(tmp_path / "out") == []
    assert guarded.limits == Limits(**raised)


@pytest.mark.parametrize(("name", "settings", "flags", "phrases", "raised"), PIXELS, ids=_ids(PIXELS))
def test_pixel_limits_refused_by_the_cli(guarded, monkeypatch, tmp_path, capsys, name, settings, flags, phrases,
                                         raised):
    use_pipeline(monkeypatch, guarded)  # the UNet never runs
    code, out, err = generate(capsys, "a red circle", *flags, "--out", str(tmp_path / "out"))
    assert code == 2 and out == ""
    assert_one_error_line(err, *phrases)
    assert images_in(tmp_path / "out") == []


@pytest.mark.parametrize(("name", "settings", "flags", "phrases", "raised"), PIXELS, ids=_ids(PIXELS))
def test_pixel_limits_refused_by_the_cli_before_loading(no_load, tmp_path, capsys, name, settings, flags, phrases,
                                                        raised):
    code, _, err = generate(capsys, "a red circle", *flags, "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, *phrases)


def test_more_limits_of_the_api(guarded):
    with pytest.raises(InvalidInputError, match=r"70 images \(10 prompts x batch 7\).*max_batch=64"):
        guarded(["a red circle"] * 10, batch_size=7)
    with pytest.raises(InvalidInputError, match="seed 4294967295 \\+ 2 images passes the largest seed"):
        guarded("a red circle", seed=2**32 - 1, batch_size=2)
    with pytest.raises(InvalidInputError, match="hires fix's target|max_width"):
        guarded("a red circle", width=1024, height=64, enable_hr=True, hr_scale=4)  # 4096 wide
    guarded.limits = Limits(max_steps=2)
    with pytest.raises(InvalidInputError, match="max_steps=2"):
        guarded("a red circle", steps=3)


def test_a_raised_limit_generates(fresh, tmp_path, monkeypatch, capsys):
    """End to end, no stand-ins: a lowered limit refuses, a raised one gives images."""
    fresh.limits = Limits(max_steps=2)
    with pytest.raises(InvalidInputError, match="max_steps=2"):
        fresh("a red circle", steps=3, seed=1)
    fresh.limits = Limits(max_steps=3)
    result = fresh("a red circle", steps=3, seed=1)
    assert [img.size for img in result] == [(64, 64)] and "Steps: 3" in result[0].info["parameters"]

    use_pipeline(monkeypatch, fresh)
    out = tmp_path / "out.png"
    code, _, err = generate(capsys, "a red circle", "--steps", "3", "--seed", "1", "--limit", "max_steps=2",
                            "--out", str(out))
    assert code == 2 and not out.exists()
    assert_one_error_line(err, "steps 3", "max_steps=2")
    code, printed, _ = generate(capsys, "a red circle", "--steps", "3", "--seed", "1", "--limit", "max_steps=3",
                                "--out", str(out))
    assert code == 0 and printed.strip() == str(out)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(result[0]))


def test_bad_limit_flags(no_load, tmp_path, capsys):
    for flag, phrases in [("max_stpes=300", ["max_stpes", "did you mean 'max_steps'"]),
                          ("max_steps=abc", ["max_steps", "'abc' is not a valid int"]),
                          ("max_steps=0", ["max_steps must be positive"]), ("max_steps", ["KEY=VALUE"])]:
        code, _, err = generate(capsys, "x", "--limit", flag, "--out", str(tmp_path / "out"))
        assert code == 2
        assert_one_error_line(err, *phrases)
    assert not (tmp_path / "out").exists()


# ---- wrong types, names and combinations (the API; the CLI's flags are typed by argparse)

WRONG_TYPES = [
    (dict(steps="20"), ["steps must be int", "'20'"]),
    (dict(steps=2.5), ["steps must be int", "2.5"]),
    (dict(sampler_name=3), ["sampler_name must be str", "3"]),
    (dict(width=True), ["width must be int", "True"]),
    (dict(seed=True), ["seed must be int"]),
    (dict(cfg_scale="7"), ["cfg_scale must be float"]),
    (dict(prompt=3), ["prompt must be", "not 3"]),
    (dict(prompt=["a", 3]), ["prompt must hold strings only"]),
    (dict(prompt=[]), ["prompt"]),
    (dict(negative_prompt=["a", "b"]), ["2 negative prompts for 1 prompts"]),
    (dict(enable_hr="yes"), ["enable_hr must be True or False"]),
]


@pytest.mark.parametrize(("settings", "phrases"), WRONG_TYPES, ids=[repr(case[0]) for case in WRONG_TYPES])
def test_wrong_types_refused(guarded, settings, phrases):
    settings = {"prompt": "a red circle", **settings}
    with pytest.raises(InvalidInputError) as error:
        guarded(**settings)
    for phrase in phrases:
        assert phrase in str(error.value)


def test_unknown_keyword_names_the_closest(guarded):
    for name, closest in [("stpes", "steps"), ("guidance_scal", "guidance_scale"), ("hr_scael", "hr_scale"),
                          ("mask_blurr", "mask_blur"), ("enable_hrr", "enable_hr")]:
        with pytest.raises(InvalidInputError, match=f"unknown argument '{name}'; did you mean '{closest}'"):
            guarded("x", **{name: 3})
    with pytest.raises(InvalidInputError, match="unknown argument 'zzz'\\.$"):
        guarded("x", zzz=3)  # nothing close: no guess
    with pytest.raises(InvalidInputError, match="unknown argument 'stpes'; did you mean 'steps'"):
        GenerationRequest.from_kwargs(stpes=3)


def test_alias_and_field_together_refused(guarded):
    for settings, phrase in [(dict(steps=3, num_inference_steps=3), "'num_inference_steps' and another name"),
                             (dict(cfg_scale=3.0, guidance_scale=3.0), "('cfg_scale') were both given"),
                             (dict(sampler="Euler", sampler_name="Euler"), "('sampler_name') were both given"),
                             (dict(strength=0.5, denoising_strength=0.5), "('denoising_strength')"),
                             (dict(image=square(), init_image=square()), "('init_image')")]:
        with pytest.raises(InvalidInputError) as error:
            guarded("x", **settings)
        assert phrase in str(error.value)
    with pytest.raises(InvalidInputError, match="hr_scale set but the hires fix is off: pass enable_hr=True"):
        guarded("x", hr_scale=2.0)
    with pytest.raises(InvalidInputError, match="either a request or prompt and settings"):
        guarded("x", request=GenerationRequest("y"))
    with pytest.raises(InvalidInputError, match="mask needs an init image"):
        guarded("x", mask_image=square(mode="L"))


def test_aliases_and_a1111_names_make_the_same_request():
    a = GenerationRequest.from_kwargs(prompt="x", num_inference_steps=7, guidance_scale=3.0, sampler="Euler",
                                      schedule="Karras", num_images_per_prompt=2, strength=0.5, enable_hr=True,
                                      hr_scale=1.5, mask_blur=8)
    b = GenerationRequest("x", steps=7, cfg_scale=3.0, sampler_name="Euler", scheduler="Karras", batch_size=2,
                          denoising_strength=0.5, hires=HiresFix(hr_scale=1.5))
    assert a == b.replace(inpaint=Inpainting(mask_blur=8))


def test_cli_type_errors_exit_2_without_traceback(no_load, tmp_path, capsys):
    for flags, phrase in [(["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
                          (["--cfg", "high"], "argument --cfg: invalid float value"),
                          (["--stpes", "3"], "unrecognized arguments: --stpes"),
                          (["--hires-upscaler", "ESRGAN"], "argument --hires-upscaler: invalid choice")]:
        with pytest.raises(SystemExit) as exit:
            main(["generate", "x", *flags, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and phrase in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_any_multiple_of_8_generates(pipe):
    """Sizes whose latents the UNet's downsampling rounds up (48 px: 6 -> 3 -> 2 latents) work, as in A1111."""
    images = pipe("a red circle", width=64, height=48, steps=2, seed=1)
    assert images[0].size == (64, 48)


# ---- --from image.png

FIRST = ["a red circle", "--negative", "blue", "--steps", "3", "--sampler", "Euler a", "--schedule", "Exponential",
         "--cfg", "3.5", "--seed", "1234", "--width", "64", "--height", "32", "--clip-skip", "2", "--eta", "0.5",
         "--hires-scale", "2", "--hires-steps", "2", "--hires-denoise", "0.6", "--hires-upscaler", "Latent (nearest)"]


@pytest.fixture
def first_image(fresh, monkeypatch, tmp_path, capsys) -> Path:
    """An image made with a non-default value for every field the infotext holds, hires fix on."""
    use_pipeline(monkeypatch, fresh)
    first = tmp_path / "first.png"
    code, out, _ = generate(capsys, *FIRST, "--out", str(first))
    assert code == 0 and out.strip() == str(first)
    return first


def test_from_restores_every_field(first_image, tmp_path, capsys):
    text = read_infotext(first_image)
    request = parse_infotext(text).request
    default = GenerationRequest()
    assert request == default.replace(
        prompt="a red circle", negative_prompt="blue", steps=3, sampler_name="Euler a", scheduler="Exponential",
        cfg_scale=3.5, seed=1234, width=64, height=32, clip_skip=2, eta=0.5,
        hires=HiresFix(hr_scale=2.0, hr_second_pass_steps=2, hr_denoising_strength=0.6, hr_upscaler="Latent (nearest)"))
    assert Image.open(first_image).size == (128, 64)

    again = tmp_path / "again.png"
    code, out, _ = generate(capsys, "--from", str(first_image), "--out", str(again))
    assert code == 0 and out.strip() == str(again)
    assert read_infotext(again) == text
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first_image)))


def test_flags_override_from(first_image, tmp_path, capsys):
    out = tmp_path / "third.png"
    code, _, _ = generate(capsys, "a blue square", "--from", str(first_image), "--steps", "2", "--seed", "77",
                          "--cfg", "5", "--sampler", "Euler", "--hires-steps", "4", "--out", str(out))
    assert code == 0
    first = parse_infotext(read_infotext(first_image)).request
    third = parse_infotext(read_infotext(out)).request
    changed = dict(prompt="a blue square", steps=2, seed=77, cfg_scale=5.0, sampler_name="Euler",
                   hires=dataclasses.replace(first.hires, hr_second_pass_steps=4))
    assert third == first.replace(**changed)  # everything else (schedule, size, clip skip, eta, hires) kept
    assert Image.open(out).size == (128, 64)


def test_from_a_text_without_cfg_or_size_gets_the_models_defaults(fresh, monkeypatch, tmp_path, capsys):
    use_pipeline(monkeypatch, fresh)
    bare = tmp_path / "bare.png"
    save_png(Image.new("RGB", (8, 8)), bare, "a red circle\nSteps: 2, Sampler: Euler, Seed: 5")
    out = tmp_path / "out.png"
    code, _, _ = generate(capsys, "--from", str(bare), "--out", str(out))
    assert code == 0
    request = parse_infotext(read_infotext(out)).request
    # the built-in model's CFG 4 and 64x64, not A1111's 7 and 512x512
    assert (request.cfg_scale, request.width, request.height) == (fresh.defaults.cfg_scale, 64, 64) == (4.0, 64, 64)
    assert (request.steps, request.sampler_name, request.seed) == (2, "Euler", 5)
    assert Image.open(out).size == (64, 64)


def test_from_refuses_images_without_parameters(no_load, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code, _, err = generate(capsys, "--from", str(tmp_path / "plain.png"), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, "plain.png carries no generation parameters")
    code, _, err = generate(capsys, "--from", str(tmp_path / "missing.png"), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, "missing.png", "no such file")
    code, _, err = generate(capsys, "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_error_line(err, "give a prompt")


def test_from_restores_guidance_rescale(fresh, monkeypatch, tmp_path, capsys):
    use_pipeline(monkeypatch, fresh)
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert generate(capsys, "a red circle", "--steps", "2", "--seed", "3", "--guidance-rescale", "0.7",
                    "--out", str(first))[0] == 0
    assert generate(capsys, "--from", str(first), "--out", str(again))[0] == 0
    assert parse_infotext(read_infotext(again)).request.guidance_rescale == 0.7
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))


# ---- python -m sdtorch

def test_python_dash_m(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "m.png"
    run = subprocess.run([sys.executable, "-m", "sdtorch", "generate", "a red circle", "--steps", "2", "--seed", "3",
                          "--out", str(out), "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    request = parse_infotext(read_infotext(out)).request
    assert (request.steps, request.seed, request.width, request.cfg_scale) == (2, 3, 64, 4.0)
    run = subprocess.run([sys.executable, "-m", "sdtorch", "generate", "x", "--steps", "0"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 2
    assert_one_error_line(run.stderr, "steps 0")


# ---- warnings come back with the result

@pytest.fixture(scope="module")
def bf16_vae_pipe():
    """The built-in model with its VAE in bfloat16: a NaN decode there is retried in float32, with a warning."""
    pipe = sdtorch.load()
    pipe.vae.to(torch.bfloat16)
    return pipe


@pytest.fixture
def nan_once(monkeypatch):
    """The first VAE decode returns NaNs (as a float16 VAE overflowing does); the dtypes decoded in are recorded."""
    real = AutoencoderKL.decode
    dtypes = []

    def decode(self, z):
        dtypes.append(next(self.parameters()).dtype)
        out = real(self, z)
        return torch.full_like(out, math.nan) if len(dtypes) == 1 else out

    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    return dtypes


WARNING = "VAE produced NaNs in bfloat16; decoded in float32 instead"


def test_warnings_come_back_with_the_result(bf16_vae_pipe, nan_once):
    result = bf16_vae_pipe("a red circle", steps=2, seed=1)
    assert result.warnings == [WARNING]
    assert nan_once == [torch.bfloat16, torch.float32]  # decoded again by a float32 copy ...
    assert next(bf16_vae_pipe.vae.parameters()).dtype == torch.bfloat16  # ... the pipeline's VAE untouched
    assert np.asarray(result[0]).std() > 0  # a real picture, not a black square
    again = bf16_vae_pipe("a red circle", steps=2, seed=1)
    assert again.warnings == [] and isinstance(again.warnings, list)  # not carried over from the last call
    difference = np.abs(np.asarray(again[0], dtype=float) - np.asarray(result[0], dtype=float))
    assert difference.mean() < 2  # the same image, decoded in bfloat16 this time


def test_cli_prints_warnings(bf16_vae_pipe, nan_once, monkeypatch, tmp_path, capsys):
    use_pipeline(monkeypatch, bf16_vae_pipe)
    out = tmp_path / "w.png"
    code, printed, err = generate(capsys, "a red circle", "--steps", "2", "--seed", "1", "--out", str(out))
    assert code == 0 and printed.strip() == str(out) and out.exists()
    assert f"sdtorch: warning: {WARNING}\n" in err and "Traceback" not in err


# ---- text from files is printed escaped

def test_info_escapes_control_characters(tmp_path, capsys):
    path = tmp_path / "evil.png"
    save_png(Image.new("RGB", (8, 8)), path,
             "a \x1b[31mred\x1b[0m circle\rgotcha \u202eevil\nSteps: 2, Sampler: Euler, Seed: 1")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    assert "a \\x1b[31mred\\x1b[0m circle\\rgotcha \\u202eevil\nSteps: 2" in out  # newlines kept
    assert main(["info", str(tmp_path / "gone\x1b[2J.png")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert_one_error_line(err, "gone\\x1b[2J.png")


# ---- Ctrl-C

def test_ctrl_c_while_sampling_leaves_no_file(fresh, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(fresh, "unet", StopUNet(KeyboardInterrupt))
    use_pipeline(monkeypatch, fresh)
    folder = tmp_path / "out"
    code, out, err = generate(capsys, "a red circle", "--steps", "2", "--out", str(folder))
    assert code == 130 and out == ""
    assert err.strip().splitlines()[-1] == "sdtorch: interrupted" and "Traceback" not in err
    assert images_in(folder) == []


def test_ctrl_c_while_writing_leaves_no_temp_file(fresh, monkeypatch, tmp_path, capsys):
    def interrupted(image, path, text):
        Path(path).write_bytes(b"\x89PNG half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(sdtorch.outputs, "save_png", interrupted)
    use_pipeline(monkeypatch, fresh)
    for out in (tmp_path / "folder", tmp_path / "file" / "one.png"):
        code, printed, err = generate(capsys, "a red circle", "--steps", "2", "--seed", "1", "--out", str(out))
        assert code == 130 and printed == ""
        assert "sdtorch: interrupted" in err
        assert images_in(out if out.suffix == "" else out.parent) == []  # neither the image nor its temp file


# ---- the request as the infotext writes it

def test_result_request_is_resolved(fresh):
    result = fresh("a red circle", steps=2, seed=9)
    assert result.request == GenerationRequest("a red circle", steps=2, seed=9, sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=4.0,
                                               width=64, height=64)
    text = format_infotext(result.request, model_name=fresh.model_name, version=parse_infotext(
        result[0].info["parameters"]).version)
    assert text == result[0].info["parameters"]
