"""Schedules and the denoiser: against the reference values, diffusers' schedulers and the formulas."""

import pytest
import torch

from sdtorch.errors import InvalidInputError
from sdtorch.sampling.denoiser import Denoiser
from sdtorch.sampling.schedules import DiscreteSchedule, sampling_schedule


def diffusers_config(**overrides):
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
    return {**base, **overrides}


def test_sd_sigma_range():
    s = DiscreteSchedule()
    assert s.sigma_min == pytest.approx(0.0291672, abs=1e-6)
    assert s.sigma_max == pytest.approx(14.614641, abs=1e-5)


def test_karras_sigmas_sd1_n20_match_reference_vector():
    sigmas = sampling_schedule(DiscreteSchedule(), 20, "karras").sigmas
    assert len(sigmas) == 21 and sigmas[-1] == 0
    expected_head, expected_tail = [14.6146, 11.7254, 9.3402], [0.0485, 0.0292, 0.0]
    assert sigmas[:3].tolist() == pytest.approx(expected_head, abs=1e-4)
    assert sigmas[-3:].tolist() == pytest.approx(expected_tail, abs=1e-4)


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_karras_and_exponential_match_diffusers_with_linspace_spacing(kind):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**diffusers_config(
        timestep_spacing="linspace", use_karras_sigmas=kind == "karras", use_exponential_sigmas=kind == "exponential"))
    ref.set_timesteps(25)
    ours = sampling_schedule(DiscreteSchedule(), 25, kind)
    torch.testing.assert_close(ours.sigmas.float(), ref.sigmas.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.timesteps.float(), ref.timesteps.float(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 10, 25, 999])
def test_timestep_spacing_and_sigmas_match_diffusers(spacing, steps):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**diffusers_config(timestep_spacing=spacing))
    ref.set_timesteps(steps)
    ours = sampling_schedule(DiscreteSchedule(), steps, "automatic", spacing)
    torch.testing.assert_close(ours.timesteps.float(), ref.timesteps.float())
    torch.testing.assert_close(ours.sigmas.float(), ref.sigmas.float(), rtol=1e-6, atol=1e-6)


def test_sigma_to_t_inverts_t_to_sigma():
    s = DiscreteSchedule()
    t = torch.tensor([0.0, 1.0, 17.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(torch.arange(1000.0, dtype=torch.float64))),
                          torch.arange(1000.0, dtype=torch.float64), atol=1e-9)
    back = s.sigma_to_t(s.t_to_sigma(t))  # log- vs linear interpolation between integers: close, not equal
    assert torch.allclose(back, t, atol=0.01)


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5])
def test_bad_step_counts(bad):
    with pytest.raises(InvalidInputError, match="steps"):
        sampling_schedule(DiscreteSchedule(), bad)


def test_unknown_schedule_and_spacing_list_valid_names():
    with pytest.raises(InvalidInputError, match="karras"):
        sampling_schedule(DiscreteSchedule(), 10, "polyexponential-ish")
    with pytest.raises(InvalidInputError, match="trailing"):
        sampling_schedule(DiscreteSchedule(), 10, "automatic", "sideways")


# ---- the denoiser ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_x0_matches_diffusers_parameterisation(unet, prediction_type):
    """x0 from DDIM's formulas in variance-preserving space equals the denoiser's sigma-space x0."""
    sched = DiscreteSchedule()
    d = Denoiser(unet, sched, prediction_type)
    t = torch.tensor([37, 640])
    abar = sched.alphas_cumprod[t].float()[:, None, None, None]
    x_t = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 128)
    with torch.no_grad():
        out = unet(x_t, t, ctx)
        if prediction_type == "epsilon":
            x0_ref = (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        else:
            x0_ref = abar.sqrt() * x_t - (1 - abar).sqrt() * out
        sigma = sched.sigmas[t]
        x = x_t * (1 + sigma.float()[:, None, None, None] ** 2).sqrt()  # the same point in sigma space
        x0 = d(x, sigma, ctx)
    torch.testing.assert_close(x0, x0_ref, rtol=1e-4, atol=1e-5)


def test_guidance_in_one_batch_and_scale_one_skips_uncond(unet):
    calls = []

    def counting_unet(x, t, ctx):
        calls.append(x.shape[0])
        return unet(x, t, ctx)

    d = Denoiser(counting_unet, DiscreteSchedule())
    x, cond, uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 128), torch.randn(1, 5, 128)
    with torch.no_grad():
        guided = d(x, 3.0, cond, uncond, guidance_scale=7.5)
        c, u = d(x, 3.0, cond), d(x, 3.0, uncond)
        plain = d(x, 3.0, cond, uncond, guidance_scale=1.0)
    assert calls == [2, 1, 1, 1]  # guidance: one doubled batch; scale 1: no uncond pass
    torch.testing.assert_close(guided, u + 7.5 * (c - u), rtol=1e-4, atol=1e-4)  # batch of 2 vs 1: float noise x 7.5
    torch.testing.assert_close(plain, c)


def test_guidance_rescale_matches_diffusers(unet):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    sched = DiscreteSchedule()
    d = Denoiser(unet, sched)
    x, cond, uncond = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 128), torch.randn(1, 5, 128)
    sigma = sched.sigmas[500].item()
    t = torch.tensor([500])
    with torch.no_grad():
        x0 = d(x, sigma, cond, uncond, guidance_scale=6.0, guidance_rescale=0.7)
        x_t = x / (1 + sigma**2) ** 0.5
        e_u, e_c = unet(x_t, t, uncond), unet(x_t, t, cond)
        eps = rescale_noise_cfg(e_u + 6.0 * (e_c - e_u), e_c, guidance_rescale=0.7)
    torch.testing.assert_close(x0, x - sigma * eps, rtol=1e-4, atol=1e-4)  # batch of 2 vs 1: float noise x 6


def test_negative_guidance_is_refused(unet):
    d = Denoiser(unet, DiscreteSchedule())
    with pytest.raises(InvalidInputError, match="guidance"):
        d(torch.randn(1, 4, 8, 8), 1.0, torch.randn(1, 5, 128), torch.randn(1, 5, 128), guidance_scale=-1)
