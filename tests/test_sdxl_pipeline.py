"""SDXL generation against diffusers' SDXL pipelines with identical (tiny, random) weights: txt2img, img2img and
inpainting on the base, the refiner as an img2img model, the pooled embedding and time ids, and the refiner as a
second stage (A1111's refiner: the sampler keeps running and the model changes at `refiner_switch_at`)."""

import numpy as np
import pytest
import torch
from conftest import assert_parity, psnr, random_pipeline
from PIL import Image

from sdtorch.configs import TINY_SDXL, TINY_SDXL_REFINER
from sdtorch.generation import sdxl_time_ids
from sdtorch.models.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # image side; the tiny VAE downsamples by 2, so latents are 16x16
STEPS = 8
PROMPT, NEGATIVE = "a red circle in the top left", "blurry"
# sdtorch (sampler, schedule) -> diffusers scheduler class and the config that reproduces it
SCHEDULERS = {
    ("DPM++ 2M", "Karras"): ("DPMSolverMultistepScheduler",
                             dict(use_karras_sigmas=True, algorithm_type="dpmsolver++", final_sigmas_type="zero")),
    ("Euler a", "Automatic"): ("EulerAncestralDiscreteScheduler", {}),
    ("DDIM", "Automatic"): ("DDIMScheduler", {}),
}
# SDXL's shipped scheduler settings (leading spacing, offset 1), as the hub's scheduler_config.json
BASE_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon", clip_sample=False,
                      set_alpha_to_one=False)


def scheduler(sampler: str, schedule: str):
    import diffusers

    name, extra = SCHEDULERS[(sampler, schedule)]
    return getattr(diffusers, name).from_config({**BASE_SCHEDULER, **extra})


def _tokenizer(folder, pad: str):
    from transformers import CLIPTokenizer as HFTokenizer

    CLIPTokenizer.default(pad_token=pad).save(folder)
    return HFTokenizer.from_pretrained(folder)


def diffusers_parts(pipe, folder) -> dict:
    """diffusers / transformers models holding the weights of sdtorch's `pipe` (an SDXL base or refiner)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = pipe.config
    unet = UNet2DConditionModel(**{k: v for k, v in config.unet.to_diffusers().items() if k != "_class_name"})
    unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    vae = AutoencoderKL(**{k: v for k, v in config.vae.to_diffusers().items() if k != "_class_name"})
    vae.load_state_dict(pipe.vae.state_dict(), strict=True)
    encoders = []
    for cfg, ours in zip(config.text_encoders, pipe.text_encoder.encoders):
        hf_config = CLIPTextConfig(**cfg.to_diffusers())
        if cfg.with_projection:  # transformers 5 keeps `text_model.` on the projection model's keys
            model = CLIPTextModelWithProjection(hf_config)
            state = {k if k.startswith("text_projection") else f"text_model.{k}": v
                     for k, v in ours.state_dict().items()}
        else:
            model, state = CLIPTextModel(hf_config), ours.state_dict()
        model.load_state_dict(state, strict=True)
        encoders.append(model.eval())
    pads = ["<|endoftext|>" if c.pad_token_id == c.eos_token_id else "!" for c in config.text_encoders]
    tokenizers = [_tokenizer(folder / f"tokenizer{i}", pad) for i, pad in enumerate(pads)]
    if len(encoders) == 1:  # the refiner: bigG alone, diffusers' second encoder
        encoders, tokenizers = [None, *encoders], [None, *tokenizers]
    return dict(vae=vae.eval(), unet=unet.eval(), text_encoder=encoders[0], text_encoder_2=encoders[1],
                tokenizer=tokenizers[0], tokenizer_2=tokenizers[1])


def reference(parts: dict, kind: str, sampler: str, schedule: str, **options):
    import diffusers

    cls = {"txt2img": diffusers.StableDiffusionXLPipeline, "img2img": diffusers.StableDiffusionXLImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionXLInpaintPipeline}[kind]
    pipe = cls(**parts, scheduler=scheduler(sampler, schedule), **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pipe = random_pipeline(TINY_SDXL, seed=21)
    return pipe, diffusers_parts(pipe, tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    pipe = random_pipeline(TINY_SDXL_REFINER, seed=22)
    return pipe, diffusers_parts(pipe, tmp_path_factory.mktemp("sdxl-refiner"))


def make_image(seed: int = 5) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def make_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    return Image.fromarray(mask)


def common(seed: int) -> dict:
    return dict(num_inference_steps=STEPS, guidance_scale=6.0, generator=torch.Generator().manual_seed(seed))


# ---- conditioning ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["base", "refiner"])
@torch.no_grad()
def test_pooled_embedding_and_time_ids_equal_diffusers(model, base, refiner):
    from sdtorch.prompts import encode_prompt_groups

    pipe, parts = base if model == "base" else refiner
    if model == "refiner":
        ref = reference(parts, "img2img", "Euler a", "Automatic", requires_aesthetics_score=True)
    else:
        ref = reference(parts, "txt2img", "Euler a", "Automatic")
    context, negative_context, pooled, negative_pooled = ref.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    encoded, pools = encode_prompt_groups(pipe.tokenizer, pipe.text_encoder, [[PROMPT], [NEGATIVE]])
    assert_parity(encoded[0], context)
    assert_parity(encoded[1], negative_context)
    assert_parity(pools[0], pooled)
    assert_parity(pools[1], negative_pooled)

    width, height = 48, 32
    ids_args = dict(original_size=(height, width), crops_coords_top_left=(0, 0), target_size=(height, width),
                    dtype=torch.float32, text_encoder_projection_dim=pooled.shape[-1])
    if model == "refiner":
        ids_args |= dict(aesthetic_score=6.0, negative_aesthetic_score=2.5, negative_original_size=(height, width),
                         negative_crops_coords_top_left=(0, 0), negative_target_size=(height, width))
        ids, negative_ids = ref._get_add_time_ids(**ids_args)
    else:
        ids = negative_ids = ref._get_add_time_ids(**ids_args)  # the base's negative ids default to these
    assert_parity(sdxl_time_ids(pipe.config, width, height, negative=False)[None], ids)
    assert_parity(sdxl_time_ids(pipe.config, width, height, negative=True)[None], negative_ids)


# ---- whole images ------------------------------------------------------------------------------

@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_txt2img_matches_diffusers(base, sampler, schedule):
    pipe, parts = base
    ref = reference(parts, "txt2img", sampler, schedule)
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, **common(0)).images[0]
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, sampler=sampler, schedule=schedule,
                **common(0))[0]
    assert psnr(ours, theirs) >= 50


@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_img2img_matches_diffusers(base, sampler, schedule):
    pipe, parts = base
    ref = reference(parts, "img2img", sampler, schedule)
    image = make_image()
    theirs = ref(PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, **common(1)).images[0]
    ours = pipe(PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, sampler=sampler, schedule=schedule,
                **common(1))[0]
    assert psnr(ours, theirs) >= 50


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_inpainting_matches_diffusers(base, sampler, schedule, strength):
    pipe, parts = base
    ref = reference(parts, "inpaint", sampler, schedule)
    image, mask = make_image(6), make_mask()
    theirs = ref(PROMPT, image=image, mask_image=mask, strength=strength, height=SIZE, width=SIZE,
                 negative_prompt=NEGATIVE, **common(2)).images[0]
    ours = pipe(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE, sampler=sampler,
                schedule=schedule, mask_blur=0, mask_overlay=False, **common(2))[0]
    assert psnr(ours, theirs) >= 50


@pytest.mark.parametrize(("sampler", "schedule"), list(SCHEDULERS))
def test_refiner_as_img2img_model_matches_diffusers(refiner, sampler, schedule):
    pipe, parts = refiner
    ref = reference(parts, "img2img", sampler, schedule, requires_aesthetics_score=True)
    image = make_image(7)
    theirs = ref(PROMPT, image=image, strength=0.5, negative_prompt=NEGATIVE, **common(3)).images[0]
    ours = pipe(PROMPT, image=image, strength=0.5, negative_prompt=NEGATIVE, sampler=sampler, schedule=schedule,
                **common(3))[0]
    assert psnr(ours, theirs) >= 50


def test_empty_negative_is_zeros_as_diffusers_without_a_negative(base):
    """A1111 zeroes an all-empty negative side on SDXL; diffusers does when negative_prompt is None
    (force_zeros_for_empty_prompt, SDXL base's default)."""
    pipe, parts = base
    ref = reference(parts, "txt2img", "Euler a", "Automatic")
    theirs = ref(PROMPT, negative_prompt=None, height=SIZE, width=SIZE, **common(4)).images[0]
    ours = pipe(PROMPT, negative_prompt="", height=SIZE, width=SIZE, sampler="Euler a", schedule="Automatic",
                **common(4))[0]
    assert psnr(ours, theirs) >= 50
    encoded_empty = ref(PROMPT, negative_prompt="", height=SIZE, width=SIZE, **common(4)).images[0]
    assert psnr(ours, encoded_empty) < 40  # diffusers encodes "" when it is given


# ---- the refiner as a second stage -------------------------------------------------------------

def diffusers_base_then_refiner(base_parts, refiner_parts, sampler, schedule, switch_at, seed):
    """diffusers' two-pipeline SDXL recipe: the base stops at `denoising_end` and hands its latents over, the
    refiner (an img2img pipeline) starts there; one generator runs through both."""
    generator = torch.Generator().manual_seed(seed)
    settings = dict(num_inference_steps=STEPS, guidance_scale=6.0, negative_prompt=NEGATIVE, generator=generator)
    first = reference(base_parts, "txt2img", sampler, schedule)
    latents = first(PROMPT, height=SIZE, width=SIZE, denoising_end=switch_at, output_type="latent", **settings).images
    second = reference(refiner_parts, "img2img", sampler, schedule, requires_aesthetics_score=True)
    return second(PROMPT, image=latents, denoising_start=switch_at, **settings).images[0]


@pytest.mark.parametrize(("sampler", "schedule"), [("Euler a", "Automatic"), ("DDIM", "Automatic")])
def test_base_then_refiner_matches_diffusers_two_stages(base, refiner, sampler, schedule):
    """The refiner takes over at the first step whose timestep t has (999 - t) / 1000 >= 0.8 (A1111), which is
    diffusers' split at denoising_end / denoising_start 0.8 (t < 200). Euler a and DDIM carry no state from
    step to step but x (and the generator, shared), so A1111's continuing sampler and diffusers' restart agree.

    DPM++ 2M does not: see `test_dpmpp_2m_continues_its_history_unlike_diffusers`.
    """
    pipe, base_parts = base
    refiner_pipe, refiner_parts = refiner
    theirs = diffusers_base_then_refiner(base_parts, refiner_parts, sampler, schedule, 0.8, seed=5)
    seen = []
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, sampler=sampler, schedule=schedule,
                refiner=refiner_pipe, refiner_switch_at=0.8, callback=seen.append, **common(5))
    assert psnr(ours[0], theirs) >= 50
    assert len(seen) == STEPS and ours.warnings == []  # one sampler run of STEPS steps
    base_only = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, sampler=sampler, schedule=schedule,
                     **common(5))[0]
    assert psnr(base_only, theirs) < 40


def test_dpmpp_2m_continues_its_history_unlike_diffusers(base, refiner):
    """What we found for DPM++ 2M Karras (8 steps, switch at 0.8): both hand the last 3 steps (t = 90, 12, 0) to
    the refiner, but diffusers' refiner pipeline starts a fresh multistep solver whose first step is first order,
    where A1111's (and sdtorch's) sampler keeps running and makes that step second order with the base's last
    x0 estimate. Only that step differs (the last is first order in both), so the images are close but not
    equal: 54.6 dB here, where the samplers that agree reach float rounding (inf, or 83 dB for DPM++ 2M alone)."""
    pipe, base_parts = base
    refiner_pipe, refiner_parts = refiner
    theirs = diffusers_base_then_refiner(base_parts, refiner_parts, "DPM++ 2M", "Karras", 0.8, seed=6)
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, sampler="DPM++ 2M", schedule="Karras",
                refiner=refiner_pipe, refiner_switch_at=0.8, **common(6))[0]
    assert 45 < psnr(ours, theirs) < 65


def _quick(**kw):
    return dict(height=SIZE, width=SIZE, num_inference_steps=6, sampler="Euler", seed=3, negative_prompt=NEGATIVE, **kw)


def test_refiner_is_named_in_the_infotext_as_a1111_writes_it(base, refiner):
    from sdtorch.infotext import parse_infotext

    pipe, _ = base
    refiner_pipe, _ = refiner
    out = pipe(PROMPT, refiner=refiner_pipe, refiner_switch_at=0.8, **_quick())
    text = out[0].info["parameters"]
    assert "Refiner: refiner, Refiner switch at: 0.8" in text  # a model without a file: no name, no hash
    request = parse_infotext(text).request
    assert (request.refiner_checkpoint, request.refiner_switch_at) == ("refiner", 0.8)
    # a switch no evaluation reaches: the refiner does not run, is not named, and the user is told
    late = pipe(PROMPT, refiner=refiner_pipe, refiner_switch_at=0.9999, **_quick())
    assert "Refiner" not in late[0].info["parameters"]
    assert any("refiner did not run" in w for w in late.warnings)
    assert np.array_equal(np.asarray(late[0]), np.asarray(pipe(PROMPT, **_quick())[0]))


def test_refiner_checkpoint_is_loaded_once_and_kept(base, refiner, monkeypatch, tmp_path):
    import sdtorch.checkpoints.loading as loading
    from sdtorch.errors import InvalidInputError

    pipe, _ = base
    refiner_pipe, _ = refiner
    file = tmp_path / "refiner.safetensors"
    file.write_bytes(b"")
    calls = []
    monkeypatch.setattr(loading, "load", lambda source, **kw: calls.append((source, kw)) or refiner_pipe)
    given = pipe(PROMPT, refiner=refiner_pipe, **_quick())[0]
    by_name = pipe(PROMPT, refiner_checkpoint=str(file), **_quick())
    assert np.array_equal(np.asarray(by_name[0]), np.asarray(given))
    assert by_name.request.refiner_checkpoint == str(file)
    pipe(PROMPT, refiner_checkpoint=str(file), **_quick())
    assert calls == [(str(file), dict(dtype=pipe.dtype, device=pipe.device))]
    plain = pipe(PROMPT, refiner_checkpoint="None", **_quick())  # A1111's "no refiner"
    assert "Refiner" not in plain[0].info["parameters"]
    with pytest.raises(InvalidInputError, match="not a checkpoint file"):
        pipe(PROMPT, refiner_checkpoint=str(tmp_path / "missing.safetensors"), **_quick())
    pipe._refiner = None


def test_refiner_runs_in_the_hires_pass_only(base, refiner):
    """A1111's default ("Hires fix refiner pass: second pass"): the first pass is the base's alone."""
    pipe, _ = base
    refiner_pipe, _ = refiner
    seen, refiner_calls = [], []
    hook = refiner_pipe.unet.register_forward_hook(lambda *_: refiner_calls.append(len(seen)))
    try:
        out = pipe(PROMPT, refiner=refiner_pipe, callback=seen.append, enable_hr=True, hr_scale=1.5,
                   hr_second_pass_steps=6, hr_denoising_strength=0.5, **_quick())
    finally:
        hook.remove()
    assert out[0].size == (48, 48) and len(seen) == 6 + 3
    assert refiner_calls and min(refiner_calls) >= 6  # only after the first pass's 6 steps
    assert "Refiner: refiner" in out[0].info["parameters"]


def test_a_refiner_that_does_not_fit_is_refused(base):
    from sdtorch.configs import TINY_SD2
    from sdtorch.errors import InvalidInputError

    pipe, _ = base
    with pytest.raises(InvalidInputError, match="prediction type is v_prediction"):
        pipe(PROMPT, refiner=random_pipeline(TINY_SD2, seed=1), **_quick())


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, float("nan")])
def test_refiner_switch_at_must_be_inside_0_1(value):
    from sdtorch.errors import InvalidInputError
    from sdtorch.request import GenerationRequest

    with pytest.raises(InvalidInputError, match="refiner_switch_at"):
        GenerationRequest(prompt="x", refiner_switch_at=value).validate()


def test_switch_rule_is_a1111s_and_splits_where_diffusers_does():
    """A1111: switch when (999 - t) / 1000 >= switch_at, t the training timestep nearest the evaluation's sigma;
    diffusers' denoising_end / denoising_start: the base keeps t >= round(1000 - 1000 * switch_at)."""
    from sdtorch.sampling.samplers import ModelSwitch
    from sdtorch.sampling.schedules import DiscreteSchedule

    schedule = DiscreteSchedule()
    for at in (0.05, 0.2, 0.5, 0.7, 0.8, 0.85, 0.95):
        switch = ModelSwitch(None, None, None, at)
        cutoff = int(round(1000 - at * 1000))
        for t in range(0, 1000, 7):
            assert switch.due(schedule, schedule.sigmas[t]) == (t < cutoff), (at, t)
