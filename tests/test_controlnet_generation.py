"""ControlNets in generation against diffusers' StableDiffusionControlNetPipeline (tiny random SD1 and ControlNets
with identical weights) and its SDXL pipeline: one and two ControlNets, weights, guidance windows, step caching,
and the errors of bad units."""

import diffusers
import numpy as np
import pytest
import torch
from conftest import SCHEDULERS, psnr, random_pipeline
from PIL import Image

import sdtorch
from sdtorch.configs import TINY_SD1, TINY_SDXL, ControlNetConfig
from sdtorch.errors import InvalidInputError
from sdtorch.request import ControlNetUnit

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # the tiny VAE downsamples by 2: latents 16x16
PROMPT, NEGATIVE = "a red circle in the top left", "blurry"
# a ControlNet for the tiny SD1 UNet whose hint encoder downsamples by 2, as the tiny VAE does
TINY_CONTROLNET = ControlNetConfig(unet=TINY_SD1.unet, hint_channels=(8, 16))
CASES = {"DPM++ 2M Karras": ("DPM++ 2M", "Karras"), "Euler a": ("Euler a", "Automatic")}
DIFFUSERS_SCHEDULERS = {**SCHEDULERS, ("Euler a", "Automatic"): ("EulerAncestralDiscreteScheduler", {})}


def _controlnet(folder, seed: int, config: ControlNetConfig = TINY_CONTROLNET) -> str:
    """A diffusers ControlNetModel with random weights (zero convs and biases moved off zero), saved to `folder`."""
    torch.manual_seed(seed)
    args = {k: v for k, v in config.to_diffusers().items() if k != "_class_name"}
    model = diffusers.ControlNetModel(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or not p.any():
                p.add_(0.2 * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet-generation")
    sdtorch.save(random_pipeline(TINY_SD1, seed=11), root / "model", format="diffusers")
    return sdtorch.load(root / "model"), root / "model", [_controlnet(root / f"cn{i}", 20 + i) for i in range(2)]


def control_image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def reference(folder, controlnets: list[str], sampler: str, schedule: str):
    nets = [diffusers.ControlNetModel.from_pretrained(c) for c in controlnets]
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=nets[0] if len(nets) == 1 else nets, safety_checker=None, requires_safety_checker=False)
    name, extra = DIFFUSERS_SCHEDULERS[(sampler, schedule)]
    config = {**pipe.scheduler.config, "timestep_spacing": "leading", "steps_offset": 1, **extra}
    pipe.scheduler = getattr(diffusers, name).from_config(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(pipe, units, sampler="DPM++ 2M", schedule="Karras", seed=0):
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10, guidance_scale=7.5,
                sampler=sampler, schedule=schedule, generator=torch.Generator().manual_seed(seed), controlnet=units)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_one_controlnet_matches_diffusers(models, case):
    pipe, folder, nets = models
    sampler, schedule = CASES[case]
    image = control_image(1)
    ref = reference(folder, nets[:1], sampler, schedule)
    theirs = ref(PROMPT, image=image, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10,
                 guidance_scale=7.5, controlnet_conditioning_scale=0.8,
                 generator=torch.Generator().manual_seed(0)).images[0]
    unit = ControlNetUnit(image=image, model=nets[0], weight=0.8, resize_mode="Just Resize")
    mine = ours(pipe, [unit], sampler, schedule)
    assert psnr(mine, theirs) >= 50
    plain = ours(pipe, [], sampler, schedule)
    assert psnr(mine, plain) < 40  # the ControlNet did change the picture


@pytest.mark.parametrize("case", list(CASES))
def test_two_controlnets_match_diffusers(models, case):
    pipe, folder, nets = models
    sampler, schedule = CASES[case]
    images = [control_image(2), control_image(3, size=32)]
    ref = reference(folder, nets, sampler, schedule)
    theirs = ref(PROMPT, image=images, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10,
                 guidance_scale=7.5, controlnet_conditioning_scale=[1.0, 0.6], control_guidance_start=[0.0, 0.2],
                 control_guidance_end=[0.7, 1.0], generator=torch.Generator().manual_seed(0)).images[0]
    units = [dict(image=images[0], model=nets[0], weight=1.0, guidance_end=0.7, resize_mode="just resize"),
             dict(image=images[1], model=nets[1], weight=0.6, guidance_start=0.2, resize_mode="just resize")]
    assert psnr(ours(pipe, units, sampler, schedule), theirs) >= 50


def test_weight_zero_is_the_plain_image_and_guidance_end_matters(models):
    pipe, _, nets = models
    image = control_image(4)
    plain = np.asarray(ours(pipe, []))
    off = ours(pipe, [ControlNetUnit(image=image, model=nets[0], weight=0.0)])
    assert np.array_equal(np.asarray(off), plain)
    full = np.asarray(ours(pipe, [ControlNetUnit(image=image, model=nets[0])]))
    early = np.asarray(ours(pipe, [ControlNetUnit(image=image, model=nets[0], guidance_end=0.5)]))
    assert not np.array_equal(full, early) and not np.array_equal(early, plain)


def test_bad_units_are_clear_errors(models, tmp_path):
    pipe, _, nets = models
    image = control_image(5)

    def error(**unit) -> str:
        with pytest.raises(InvalidInputError) as e:
            pipe(PROMPT, height=SIZE, width=SIZE, steps=2, controlnet=[unit])
        return str(e.value)

    assert "controlnet[0].weight" in error(image=image, model=nets[0], weight=-1)
    assert "controlnet[0].guidance_end" in error(image=image, model=nets[0], guidance_end=1.5)
    assert "guidance_start" in error(image=image, model=nets[0], guidance_start=0.6, guidance_end=0.4)
    assert "not supported yet" in error(image=image, model=nets[0], control_mode="ControlNet is more important")
    assert "controlnet[0].control_mode" in error(image=image, model=nets[0], control_mode="balanced-ish")
    assert "controlnet[0].resize_mode" in error(image=image, model=nets[0], resize_mode="stretch")
    assert "controlnet[0].image is missing" in error(model=nets[0])
    assert "controlnet[0].model is missing" in error(image=image)
    assert "did you mean 'weight'" in error(image=image, model=nets[0], weigth=1.0)
    assert "controlnet[0].model" in error(image=image, model=str(tmp_path / "absent"))
    with pytest.raises(InvalidInputError, match=r"controlnet\[0\] must be"):
        pipe(PROMPT, height=SIZE, width=SIZE, steps=2, controlnet=["canny"])


def test_step_caching_passes_the_residuals(models):
    pipe, _, nets = models
    unit = ControlNetUnit(image=control_image(6), model=nets[0])
    cached = np.asarray(pipe(PROMPT, height=SIZE, width=SIZE, steps=6, seed=3, deep_cache=2, controlnet=[unit])[0])
    plain = np.asarray(pipe(PROMPT, height=SIZE, width=SIZE, steps=6, seed=3, deep_cache=2)[0])
    assert not np.array_equal(cached, plain)


@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_controlnet_matches_diffusers(tmp_path, case):
    from test_sdxl_pipeline import diffusers_parts, scheduler

    sampler, schedule = CASES[case]
    pipe = random_pipeline(TINY_SDXL, seed=21)
    folder = _controlnet(tmp_path / "cn", 30, ControlNetConfig(unet=TINY_SDXL.unet, hint_channels=(8, 16)))
    ref = diffusers.StableDiffusionXLControlNetPipeline(
        **diffusers_parts(pipe, tmp_path), controlnet=diffusers.ControlNetModel.from_pretrained(folder),
        scheduler=scheduler(sampler, schedule))
    ref.set_progress_bar_config(disable=True)
    image = control_image(7)
    theirs = ref(PROMPT, image=image, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=8,
                 guidance_scale=6.0, controlnet_conditioning_scale=0.9, control_guidance_end=0.8,
                 generator=torch.Generator().manual_seed(0)).images[0]
    unit = ControlNetUnit(image=image, model=folder, weight=0.9, guidance_end=0.8, resize_mode="just resize")
    mine = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=6.0,
                sampler=sampler, schedule=schedule, generator=torch.Generator().manual_seed(0), controlnet=[unit])[0]
    assert psnr(mine, theirs) >= 50
