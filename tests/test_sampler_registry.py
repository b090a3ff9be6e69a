"""The sampler registry and the `sample()` driver: names, defaults, strength, callbacks, bad input."""

import pytest
import torch

from sdtorch.configs import TINY_SD1
from sdtorch.errors import InvalidInputError
from sdtorch.models.unet import UNet
from sdtorch.sampling.denoiser import Denoiser
from sdtorch.sampling.samplers import SAMPLERS, resolve, resolve_request, sample, sampler_names
from sdtorch.sampling.schedules import DiscreteSchedule

A1111_NAMES = ["DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM++ 2S a", "Euler a", "Euler", "LMS", "Heun",
               "DPM2", "DPM2 a", "DDIM", "PLMS", "UniPC", "DDPM", "LCM"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    return Denoiser(UNet(TINY_SD1.unet).eval(), DiscreteSchedule())


def test_every_a1111_sampler_is_registered():
    assert sorted(sampler_names()) == sorted(A1111_NAMES)


@pytest.mark.parametrize(("name", "expected", "schedule"), [
    ("DPM++ 2M Karras", "DPM++ 2M", "karras"),
    ("dpmpp_2m", "DPM++ 2M", "karras"),
    ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "exponential"),
    ("Euler a", "Euler a", "automatic"),
    ("euler_ancestral", "Euler a", "automatic"),
    ("k_lms", "LMS", "automatic"),
    ("DPM2 a Karras", "DPM2 a", "karras"),
    ("uni_pc", "UniPC", "automatic"),
    ("dpmpp_3m_sde", "DPM++ 3M SDE", "exponential"),
])
def test_names_aliases_and_legacy_combined_form(name, expected, schedule):
    info, kind = resolve(name)
    assert info.name == expected and kind == schedule


def test_explicit_schedule_wins_and_comfy_names():
    assert resolve("Euler", "Karras")[1] == "karras"
    assert resolve("euler", "sgm_uniform")[1] == "trailing"
    assert resolve("DPM++ 2M", "Automatic")[1] == "automatic"  # literal kinds, as the sampling driver takes them


def test_a_requests_automatic_is_the_samplers_own_schedule():
    """In a request, A1111's "Automatic" is the sampler's own schedule; "Discrete" names the model's timesteps."""
    assert resolve_request("DPM++ 2M", "Automatic")[1] == "karras"
    assert resolve_request("DPM++ 2M SDE", "auto")[1] == "exponential"
    assert resolve_request("Euler", "Automatic")[1] == "automatic" and resolve_request("DPM++ 2M")[1] == "karras"
    assert resolve_request("DPM++ 2M", "Discrete")[1] == "automatic"
    assert resolve_request("Euler", "Karras")[1] == "karras"


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(InvalidInputError, match="DPM\\+\\+ 2M.*Euler a"):
        resolve("Euler b")
    with pytest.raises(InvalidInputError, match="Karras"):
        resolve("Euler", "wiggly")


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=1001), dict(eta=-0.1),
                                    dict(strength=0.0), dict(strength=1.5), dict(sampler="nope")])
def test_bad_arguments(denoiser, kwargs):
    noise = torch.randn(1, 4, 8, 8)
    init = torch.zeros(1, 4, 8, 8) if "strength" in kwargs else None
    with pytest.raises(InvalidInputError):
        sample(denoiser, noise, context=torch.randn(1, 5, 128), init_latents=init, **{"sampler": "Euler", **kwargs})


@pytest.mark.parametrize("name", A1111_NAMES)
def test_every_sampler_runs_with_callback_and_is_seeded(denoiser, name):
    steps = 4 if name == "LCM" else 6
    seen = []
    ctx = torch.randn(1, 5, 128)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = sample(denoiser, noise, sampler=name, steps=steps, context=ctx,
                   generator=torch.Generator().manual_seed(7), callback=seen.append)
        b = sample(denoiser, noise, sampler=name, steps=steps, context=ctx, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert [s.index for s in seen] == list(range(len(seen))) and len(seen) >= steps - 1
    assert all(s.total == seen[0].total and s.x.shape == noise.shape and s.denoised.shape == noise.shape for s in seen)
    sigmas = [s.sigma for s in seen]
    assert sigmas == sorted(sigmas, reverse=True)


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.5), (25, 0.75), (20, 1.0), (10, 0.05)])
def test_strength_runs_int_steps_times_strength_like_diffusers(denoiser, steps, strength):
    from diffusers import EulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        StableDiffusionImg2ImgPipeline,
    )

    ref = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    ref.set_timesteps(steps)
    holder = type("P", (), {"scheduler": ref})()
    ref_timesteps, ref_count = StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")
    seen = []
    init = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        if int(steps * strength) == 0:
            with pytest.raises(InvalidInputError, match="no step"):
                sample(denoiser, torch.randn(1, 4, 8, 8), sampler="Euler", schedule="Automatic", steps=steps,
                       context=torch.randn(1, 5, 128), init_latents=init, strength=strength)
            return
        sample(denoiser, torch.randn(1, 4, 8, 8), sampler="Euler", schedule="Automatic", steps=steps,
               context=torch.randn(1, 5, 128), init_latents=init, strength=strength, callback=seen.append)
    assert len(seen) == ref_count == int(steps * strength)
    first_sigma = ref.sigmas[ref.index_for_timestep(ref_timesteps[0])].item()
    assert seen[0].sigma == pytest.approx(first_sigma, rel=1e-5)


def test_registry_defaults_follow_a1111():
    defaults = {info.name: info.default_schedule for info in SAMPLERS}
    assert {n for n, k in defaults.items() if k == "karras"} == {"DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M"}
    assert {n for n, k in defaults.items() if k == "exponential"} == {"DPM++ 2M SDE", "DPM++ 3M SDE"}
