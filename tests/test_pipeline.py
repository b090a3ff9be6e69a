"""The pipeline against diffusers' pipelines with identical weights, and its seeds, infotext and errors."""

import numpy as np
import pytest
import torch
from conftest import SCHEDULERS, diffusers_pipe, psnr, random_pipeline
from PIL import Image

import sdtorch
from sdtorch.configs import TINY_SD1, UNetConfig
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext
from sdtorch.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # image side; the tiny VAE downsamples by 2, so latents are 16x16
PROMPT, NEGATIVE = "a red circle in the top left", "blurry"


def build_models(kind: str, folder) -> tuple[Pipeline, object]:
    """(sdtorch pipeline, diffusers folder) for the same tiny random weights."""
    config = TINY_SD1
    channels = {"sd1-inpaint": 9, "sd1-instruct-pix2pix": 8}.get(kind)
    if channels is not None:
        config = config.replace(unet=UNetConfig(**{**TINY_SD1.unet.__dict__, "in_channels": channels}))
    sdtorch.save(random_pipeline(config, seed=11), folder, format="diffusers")
    return sdtorch.load(folder), folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models("sd1", tmp_path_factory.mktemp("sd1") / "model")


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    return build_models("sd1-inpaint", tmp_path_factory.mktemp("sd1-inpaint") / "model")


@pytest.fixture(scope="module")
def pix2pix_model(tmp_path_factory):
    return build_models("sd1-instruct-pix2pix", tmp_path_factory.mktemp("sd1-instruct-pix2pix") / "model")


@pytest.fixture(params=["ordinary", "9-channel"])
def both_kinds(request, models, inpainting_model):
    return models if request.param == "ordinary" else inpainting_model


def make_image(seed: int = 5) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def make_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_txt2img_matches_diffusers(models, sampler, schedule):
    pipe, folder = models
    ref = diffusers_pipe(folder, "txt2img", sampler, schedule)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10,
                 guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10, guidance_scale=7.5,
                sampler=sampler, schedule=schedule, generator=torch.Generator().manual_seed(0))[0]
    assert psnr(ours, theirs) >= 50


@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_img2img_matches_diffusers(models, sampler, schedule):
    pipe, folder = models
    ref = diffusers_pipe(folder, "img2img", sampler, schedule)
    image = make_image()
    theirs = ref(PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10,
                 guidance_scale=7.5, generator=torch.Generator().manual_seed(1)).images[0]
    ours = pipe(PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10,
                guidance_scale=7.5, sampler=sampler, schedule=schedule, generator=torch.Generator().manual_seed(1))[0]
    assert psnr(ours, theirs) >= 50


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_inpainting_matches_diffusers_for_both_model_kinds(both_kinds, sampler, schedule, strength):
    pipe, folder = both_kinds
    ref = diffusers_pipe(folder, "inpaint", sampler, schedule)
    image, mask = make_image(6), make_mask()
    theirs = ref(PROMPT, image=image, mask_image=mask, strength=strength, height=SIZE, width=SIZE,
                 negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(2)).images[0]
    ours = pipe(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE,
                num_inference_steps=10, guidance_scale=7.5, sampler=sampler, schedule=schedule,
                generator=torch.Generator().manual_seed(2), mask_blur=0, mask_overlay=False)[0]
    assert psnr(ours, theirs) >= 50


@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_instruct_pix2pix_matches_diffusers(pix2pix_model, sampler, schedule):
    pipe, folder = pix2pix_model
    ref = diffusers_pipe(folder, "instruct-pix2pix", sampler, schedule)
    image = make_image(7)
    for cfg, image_cfg in ((7.5, 1.5), (4.0, 2.5), (7.5, 1.0)):  # three-way guidance; at image 1 the plain kind
        theirs = ref("make it red", image=image, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=cfg,
                     image_guidance_scale=image_cfg, generator=torch.Generator().manual_seed(3)).images[0]
        ours = pipe("make it red", image=image, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=cfg,
                    image_cfg_scale=image_cfg, strength=1.0, sampler=sampler, schedule=schedule,
                    generator=torch.Generator().manual_seed(3))[0]
        assert psnr(ours, theirs) >= 50, (cfg, image_cfg)


def test_instruct_pix2pix_requests(pix2pix_model, models, tmp_path):
    pipe, _ = pix2pix_model
    assert pipe.config.kind == "sd1-instruct-pix2pix"
    with pytest.raises(InvalidInputError, match="instruct-pix2pix model .* init image"):
        pipe(PROMPT, steps=2)
    with pytest.raises(InvalidInputError, match="no inpainting mask"):
        pipe(PROMPT, image=make_image(), mask_image=make_mask(), steps=2)
    full, part = (pipe("make it red", image=make_image(), steps=4, strength=s, seed=1)[0] for s in (1.0, 0.5))
    assert psnr(full, part) < 50  # A1111's img2img: below strength 1 the edit starts from the noised image
    fields = parse_infotext(part.info["parameters"]).request
    assert (fields.image_cfg_scale, fields.denoising_strength) == (1.5, 0.5)  # the default image guidance, written
    plain, _ = models
    ordinary = plain(PROMPT, image=make_image(), steps=2, image_cfg_scale=3.0)[0]  # other models: ignored, unsaid
    assert "Image CFG scale" not in ordinary.info["parameters"]
    sdtorch.save(pipe, tmp_path / "edit.safetensors", format="single_file")
    assert sdtorch.load(tmp_path / "edit.safetensors").config.kind == "sd1-instruct-pix2pix"


# ---- seeds -------------------------------------------------------------------------------------

def test_same_seed_same_image_and_batch_uses_seed_plus_i(models):
    pipe, _ = models
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=6, sampler="Euler", schedule="Automatic")
    a = pipe(PROMPT, seed=42, **kw)[0]
    b = pipe(PROMPT, seed=42, **kw)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    batch = pipe(PROMPT, seed=42, num_images_per_prompt=3, **kw)
    assert [img.info["seed"] for img in batch] == [42, 43, 44]
    second = pipe(PROMPT, seed=43, **kw)[0]
    assert psnr(batch[1], second) >= 50  # batch image 1 is the seed-43 image (up to batched float rounding)
    assert psnr(batch[0], batch[1]) < 30


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE", "DDPM"])
def test_seeds_follow_a1111_for_stochastic_samplers(models, sampler):
    """A1111 gives each image its own stream (its initial noise, then its sampler's noise): image i of a batch is the
    image seed + i gives alone, and one image's stream is what one generator seeded alike gives, as diffusers draws
    it. Before, the sampler's noise came from one stream for the whole batch, restarted at the first seed."""
    pipe, _ = models
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=6, sampler=sampler, schedule="Automatic")
    batch = pipe(PROMPT, seed=42, num_images_per_prompt=2, **kw)
    alone = pipe(PROMPT, seed=43, **kw)[0]
    assert psnr(batch[1], alone) >= 50
    if "SDE" not in sampler:  # (A1111 draws those samplers' noise from Brownian trees: test_dpmpp.py)
        first = pipe(PROMPT, seed=42, **kw)[0]
        assert psnr(first, pipe(PROMPT, generator=torch.Generator().manual_seed(42), **kw)[0]) >= 50
    edits = pipe(PROMPT, image=make_image(), strength=0.7, seed=42, num_images_per_prompt=2, **kw)
    assert psnr(edits[1], pipe(PROMPT, image=make_image(), strength=0.7, seed=43, **kw)[0]) >= 50  # img2img too


def test_random_seed_is_reported(models):
    pipe, _ = models
    img = pipe(PROMPT, seed=-1, height=SIZE, width=SIZE, num_inference_steps=4, sampler="Euler")[0]
    request = parse_infotext(img.info["parameters"]).request
    assert request.seed == img.info["seed"] >= 0
    again = pipe(PROMPT, seed=request.seed, height=SIZE, width=SIZE, num_inference_steps=4, sampler="Euler")[0]
    assert np.array_equal(np.asarray(img), np.asarray(again))


def test_infotext_describes_the_image(models):
    pipe, _ = models
    img = pipe(PROMPT, negative_prompt=NEGATIVE, seed=7, height=SIZE, width=SIZE, num_inference_steps=5,
               guidance_scale=6.5, sampler="DPM++ 2M", schedule="Karras", clip_skip=2)[0]
    request = parse_infotext(img.info["parameters"]).request
    assert (request.prompt, request.negative_prompt, request.steps, request.sampler_name, request.scheduler) == (
        PROMPT, NEGATIVE, 5, "DPM++ 2M", "Karras")
    assert (request.cfg_scale, request.seed, request.width, request.height, request.clip_skip) == (
        6.5, 7, SIZE, SIZE, 2)


# ---- bad input ---------------------------------------------------------------------------------

def test_inpainting_model_without_mask_is_refused(inpainting_model):
    pipe, _ = inpainting_model
    with pytest.raises(InvalidInputError, match="inpainting model"):
        pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, sampler="Euler")


def test_bad_input_gets_clear_errors(models, tmp_path):
    pipe, _ = models
    kw = dict(num_inference_steps=2, sampler="Euler")
    with pytest.raises(InvalidInputError, match="height 36 must be a multiple of 8"):
        pipe(PROMPT, height=SIZE + 4, width=SIZE, **kw)
    with pytest.raises(InvalidInputError, match="strength"):
        pipe(PROMPT, image=make_image(), strength=1.5, **kw)
    with pytest.raises(InvalidInputError, match="cfg_scale -2"):  # diffusers' guidance_scale is the field cfg_scale
        pipe(PROMPT, guidance_scale=-2, height=SIZE, width=SIZE, **kw)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(InvalidInputError, match="not-an-image"):
        pipe(PROMPT, image=bad, **kw)
    with pytest.raises(InvalidInputError, match="mask"):
        pipe(PROMPT, image=make_image(), mask_image=Image.new("L", (SIZE * 2, SIZE)), **kw)
    with pytest.raises(InvalidInputError, match="sampler"):
        pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, sampler="Euler z")


# ---- hires fix, only-masked inpainting, the command line -----------------------------------------

def test_hires_fix_generates_at_the_target_size(models):
    pipe, _ = models
    seen = []
    img = pipe(PROMPT, seed=3, height=SIZE, width=SIZE, num_inference_steps=4, sampler="Euler", callback=seen.append,
               enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4, hr_denoising_strength=0.5)[0]
    assert img.size == (48, 48)
    assert len(seen) == 4 + 2  # the base pass, then int(4 * 0.5) steps at the target size
    hires = parse_infotext(img.info["parameters"]).request.hires
    assert (hires.hr_scale, hires.hr_second_pass_steps, hires.hr_upscaler, hires.hr_denoising_strength) == (
        1.5, 4, "Latent", 0.5)


def test_inpaint_only_masked_keeps_everything_outside_the_padded_region(models):
    pipe, _ = models
    image = make_image(8).resize((64, 64))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (40, 40, 52, 52))
    out = pipe(PROMPT, image=image, mask_image=mask, width=SIZE, height=SIZE, num_inference_steps=4, sampler="Euler",
               seed=1, inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur=2)[0]
    assert out.size == (64, 64)
    before, after = np.asarray(image), np.asarray(out)
    assert np.array_equal(before[:32], after[:32]) and np.array_equal(before[:, :32], after[:, :32])
    assert not np.array_equal(before[40:52, 40:52], after[40:52, 40:52])


def test_cli_generate_from_and_info(models, tmp_path, capsys):
    from sdtorch.cli import main

    _, folder = models
    first = tmp_path / "first.png"
    args = ["generate", "a (blue:1.2) star", "--model", str(folder), "--steps", "4", "--seed", "9",
            "--width", str(SIZE), "--height", str(SIZE), "--sampler", "DPM++ 2M", "--out", str(first)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(first)
    assert main(["info", str(first)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("a (blue:1.2) star\n") and "Seed: 9" in text and "Steps: 4" in text
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(first), "--model", str(folder), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert main(["generate", "x", "--model", str(folder), "--width", "30", "--out", str(tmp_path)]) == 2
    assert "sdtorch: error: width 30 must be a multiple of 8" in capsys.readouterr().err


def test_hires_pass_with_its_own_sampler_and_prompts(models):
    pipe, _ = models
    calls = []
    hook = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, steps=4, seed=3, sampler="Euler",
              enable_hr=True, hr_scale=1.5, hr_second_pass_steps=4, hr_denoising_strength=1.0)
    try:
        same = pipe(**kw)[0]
        first_count, calls[:] = len(calls), []
        heun = pipe(**kw, hr_sampler_name="Heun", hr_scheduler="Karras")[0]
    finally:
        hook.remove()
    assert (first_count, len(calls)) == (4 + 4, 4 + 7)  # Heun: two evaluations a step but the last
    fields = parse_infotext(heun.info["parameters"]).request
    assert (fields.hires.hr_sampler_name, fields.hires.hr_scheduler) == ("Heun", "Karras")
    assert psnr(pipe(request=fields)[0], heun) == float("inf")  # the PNG says how to draw it again
    prompted = pipe(**kw, hr_prompt="a blue square <lora:ink:1>", hr_negative_prompt="red")
    assert psnr(prompted[0], same) < 50
    assert any("hires pass's prompt" in w for w in prompted.warnings)  # its LoRA tag is not applied
    text = prompted[0].info["parameters"]
    assert 'Hires prompt: "a blue square <lora:ink:1>"' in text and "Hires negative prompt: red" in text
    assert parse_infotext(text).request.hires.hr_prompt == "a blue square <lora:ink:1>"


def test_automatic_is_the_samplers_own_schedule_as_in_a1111(models):
    """A1111's "Automatic" runs DPM++ 2M on its Karras schedule (the sampler's own), as no schedule does; the
    model's discrete timesteps are "Discrete", written so and read back so."""
    pipe, _ = models
    kw = dict(prompt=PROMPT, height=SIZE, width=SIZE, steps=6, seed=4, sampler_name="DPM++ 2M")
    automatic, karras, unset = (pipe(scheduler=s, **kw)[0] for s in ("Automatic", "Karras", None))
    assert np.array_equal(np.asarray(automatic), np.asarray(karras))
    assert np.array_equal(np.asarray(unset), np.asarray(karras))
    assert "Schedule type: Karras" in automatic.info["parameters"]
    discrete = pipe(scheduler="Discrete", **kw)[0]
    assert psnr(discrete, karras) < 50 and "Schedule type: Discrete" in discrete.info["parameters"]
    again = pipe(request=parse_infotext(discrete.info["parameters"]).request)[0]
    assert np.array_equal(np.asarray(again), np.asarray(discrete))
