"""ControlNets in generation against diffusers' StableDiffusionControlNetPipeline (tiny random SD1 and ControlNets
with identical weights) and its SDXL pipeline: one and two ControlNets, weights, guidance windows, step caching,
and the errors of bad units."""

import dataclasses
import hashlib
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import SCHEDULERS, psnr, random_pipeline
from PIL import Image

import sdtorch
from sdtorch.cli import main
from sdtorch.configs import TINY_SD1, TINY_SDXL, ControlNetConfig
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext
from sdtorch.models.t2i_adapter import T2IAdapterConfig
from sdtorch.preprocessors import preprocess
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


class SoftScaledControlNet(diffusers.ControlNetModel):
    """diffusers' ControlNet with the A1111 extension's soft-injection weights written out independently: residual i
    of the 13 (12 skips, then the mid block) times 0.825 ** (12 - i), and no guess-mode scales of its own."""

    def forward(self, *args, guess_mode=False, return_dict=True, conditioning_scale=1.0, **kwargs):
        down, mid = super().forward(*args, guess_mode=False, return_dict=False, conditioning_scale=1.0, **kwargs)
        scales = [conditioning_scale * 0.825 ** (12 - i) for i in range(len(down) + 1)]
        return [d * w for d, w in zip(down, scales)], mid * scales[-1]


@pytest.mark.parametrize("mode", ["guess", "My prompt is more important", "ControlNet is more important"])
def test_guess_mode_and_the_control_modes_match_their_definitions(models, mode):
    """guess mode is diffusers' own; the extension's modes against diffusers' pipeline given a ControlNet with the
    extension's soft weights, in guess mode (ControlNet on the conditional half only) for "ControlNet is more
    important" and not for "My prompt is more important"."""
    pipe, folder, nets = models
    image = control_image(7)
    ref = reference(folder, nets[:1], "DPM++ 2M", "Karras")
    if mode != "guess":
        ref.controlnet = SoftScaledControlNet.from_pretrained(nets[0])
    theirs = ref(PROMPT, image=image, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10,
                 guidance_scale=7.5, controlnet_conditioning_scale=0.9, guess_mode=mode != "My prompt is more important",
                 generator=torch.Generator().manual_seed(0)).images[0]
    setting = dict(guess_mode=True) if mode == "guess" else dict(control_mode=mode)
    unit = ControlNetUnit(image=image, model=nets[0], weight=0.9, resize_mode="Just Resize", **setting)
    mine = ours(pipe, [unit])
    assert psnr(mine, theirs) >= 50
    balanced = ours(pipe, [ControlNetUnit(image=image, model=nets[0], weight=0.9, resize_mode="Just Resize")])
    assert psnr(mine, balanced) < 45


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
    assert "does not combine" in error(image=image, model=nets[0], guess_mode=True,
                                       control_mode="ControlNet is more important")
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


def test_the_preprocessor_runs_first_and_the_infotext_names_the_unit_as_the_extension_does(models):
    """module "canny" equals giving the canny map itself with module "none"; the infotext's "ControlNet 0" holds the
    extension's fields, the model as "name [A1111's legacy hash]", and reads back into the unit."""
    pipe, _, nets = models
    photo = control_image(8, size=48)
    canny = ours(pipe, [ControlNetUnit(image=photo, model=nets[0], module="canny", threshold_a=50, weight=0.8)])
    edges = preprocess("canny", photo, threshold_a=50)
    given = ours(pipe, [ControlNetUnit(image=edges, model=nets[0], weight=0.8)])
    assert np.array_equal(np.asarray(canny), np.asarray(given))
    weights = Path(nets[0]) / "diffusion_pytorch_model.safetensors"
    with open(weights, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    expected = (f'ControlNet 0: "Module: canny, Model: cn0 [{legacy}], Weight: 0.8, Resize Mode: Crop and Resize, '
                'Processor Res: 512, Threshold A: 50.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, '
                'Pixel Perfect: False, Control Mode: Balanced"')
    assert expected in canny.info["parameters"]
    (unit,) = parse_infotext(canny.info["parameters"]).request.controlnet
    assert unit == ControlNetUnit(model=f"cn0 [{legacy}]", module="canny", weight=0.8, resize_mode="Crop and Resize",
                                  processor_res=512, threshold_a=50.0, threshold_b=200.0)


def test_preprocessor_errors_name_the_unit(models):
    pipe, _, nets = models
    for unit, message in ((dict(module="canyn"), "did you mean 'canny'"), (dict(module="canny", threshold_a=999),
                                                                          "threshold_a"),
                          (dict(module="depth_midas"), "dpt_hybrid"), (dict(module="inpaint_only"), "mask")):
        with pytest.raises(InvalidInputError, match=rf"controlnet\[0\].*{message}"):
            pipe(PROMPT, height=SIZE, width=SIZE, steps=2, controlnet=[dict(image=control_image(9), model=nets[0],
                                                                            **unit)])


def test_the_cli_takes_control_units(models, tmp_path, capsys):
    pipe, folder, nets = models
    photo = tmp_path / "photo.png"
    control_image(10, size=48).save(photo)
    out = tmp_path / "out.png"
    code = main(["generate", PROMPT, "--model", str(folder), "--steps", "2", "--width", "32", "--height", "32",
                 "--control", str(photo), "--control-model", nets[0], "--preprocessor", "canny", "--control-weight",
                 "0.5", "--control", str(photo), "--control-model", nets[1], "--control-mode",
                 "My prompt is more important", "--control-end", "0.5", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    first, second = parse_infotext(Image.open(out).info["parameters"]).request.controlnet
    assert (first.module, first.weight, first.control_mode) == ("canny", 0.5, "Balanced")
    assert (second.module, second.guidance_end, second.control_mode) == ("none", 0.5, "My prompt is more important")
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--control-model", nets[0], "--control", str(photo)])
    assert "give it after that flag" in capsys.readouterr().err


def _t2i_adapter(folder, seed: int) -> str:
    """A diffusers T2IAdapter for the tiny SD1 UNet (its VAE downsamples by 2, so the adapter unshuffles by 2)."""
    torch.manual_seed(seed)
    config = T2IAdapterConfig(channels=TINY_SD1.unet.block_channels, downscale_factor=2)
    adapter = diffusers.T2IAdapter(**{k: v for k, v in config.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    adapter.eval().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("case", list(CASES))
def test_a_t2i_adapter_unit_matches_diffusers(models, tmp_path, case):
    """A unit whose model is a T2I-Adapter (as the A1111 extension takes them) against diffusers'
    StableDiffusionAdapterPipeline."""
    pipe, folder, _ = models
    sampler, schedule = CASES[case]
    adapter = _t2i_adapter(tmp_path / "adapter", 30)
    image = control_image(11)
    ref = diffusers.StableDiffusionAdapterPipeline.from_pretrained(
        folder, adapter=diffusers.T2IAdapter.from_pretrained(adapter), safety_checker=None,
        requires_safety_checker=False)
    name, extra = DIFFUSERS_SCHEDULERS[(sampler, schedule)]
    ref.scheduler = getattr(diffusers, name).from_config({**ref.scheduler.config, "timestep_spacing": "leading",
                                                          "steps_offset": 1, **extra})
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, image=image, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10,
                 guidance_scale=7.5, adapter_conditioning_scale=0.7, generator=torch.Generator().manual_seed(0)).images[0]
    unit = ControlNetUnit(image=image, model=adapter, weight=0.7, resize_mode="Just Resize")
    mine = ours(pipe, [unit], sampler, schedule)
    assert psnr(mine, theirs) >= 50
    assert psnr(mine, ours(pipe, [], sampler, schedule)) < 40
    soft = ours(pipe, [dataclasses.replace(unit, control_mode="My prompt is more important")], sampler, schedule)
    assert psnr(soft, mine) < 45


def test_an_sdxl_t2i_adapter_unit_matches_diffusers(tmp_path):
    """SDXL's adapter (full_adapter_xl: features after the first downsample, and one for the mid block) against
    diffusers' StableDiffusionXLAdapterPipeline, guiding the first 60% of the steps (adapter_conditioning_factor),
    on a three-level tiny SDXL UNet."""
    unet = dataclasses.replace(TINY_SDXL.unet, block_channels=(32, 64, 64), attention_levels=(False, True, True),
                               num_heads=(1, 2, 2), transformer_depth=(0, 1, 2))
    sdtorch.save(random_pipeline(TINY_SDXL.replace(unet=unet), seed=13), tmp_path / "model", format="diffusers")
    pipe = sdtorch.load(tmp_path / "model")
    torch.manual_seed(31)
    config = T2IAdapterConfig(channels=(32, 64, 64, 64), downscale_factor=4, adapter_type="full_adapter_xl")
    adapter = diffusers.T2IAdapter(**{k: v for k, v in config.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    adapter.eval().save_pretrained(tmp_path / "adapter")
    ref = diffusers.StableDiffusionXLAdapterPipeline.from_pretrained(tmp_path / "model", adapter=adapter)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
        {**ref.scheduler.config, "timestep_spacing": "leading", "steps_offset": 1})
    ref.set_progress_bar_config(disable=True)
    image = control_image(12)
    theirs = ref(PROMPT, image=image, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=10,
                 guidance_scale=7.5, adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.6,
                 generator=torch.Generator().manual_seed(0)).images[0]
    unit = ControlNetUnit(image=image, model=str(tmp_path / "adapter"), weight=0.8, guidance_end=0.6,
                          resize_mode="Just Resize")
    mine = ours(pipe, [unit], "Euler a", "Automatic")
    assert psnr(mine, theirs) >= 50
    assert psnr(mine, ours(pipe, [], "Euler a", "Automatic")) < 40
