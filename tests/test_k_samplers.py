"""k-diffusion samplers (Euler, Euler a, Heun, LMS, DPM2, DPM2 a) against diffusers' schedulers and the math.

Parity setup: the same tiny UNet (random weights) runs under our sampler + Denoiser and under the diffusers
scheduler's standard loop; final latents must agree within 1e-4 of max|reference|.

Starting point: these diffusers schedulers keep their latents in sigma space (x = x0 + sigma * eps), as
ours. With `linspace`/`trailing` spacing both start from noise * sigma_max (diffusers' init_noise_sigma).
With `leading` spacing diffusers' init_noise_sigma is sqrt(sigma_max^2 + 1) (its start is not on the ODE's
sigma_max marginal), so diffusers is started from our x = noise * sigmas[0] instead: what is compared is
the solver.

Noise: the ancestral samplers draw `randn(x.shape)` from the generator once per step that adds noise;
diffusers' Euler a draws once per step (the last draw, for sigma_up = 0, comes after every draw we use)
and KDPM2 a once per second-order step: the same draws in the same order, so with identically seeded
CPU generators the streams agree and the comparison is exact, not statistical.
"""

import itertools
import math

import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)

from sdtorch.errors import InvalidInputError
from sdtorch.sampling.denoiser import Denoiser
from sdtorch.sampling.k_samplers import (
    lms_coefficients,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from sdtorch.sampling.schedules import DiscreteSchedule, SamplingSchedule, sampling_schedule

SHAPE = (1, 4, 8, 8)
SIGMA_FLAGS = dict(use_exponential_sigmas=False, use_beta_sigmas=False)

# name: (our sampler, diffusers class, its config fields beyond the common ones, supports Karras, draws noise)
SAMPLERS = {
    "euler": (sample_euler, EulerDiscreteScheduler, dict(
        interpolation_type="linear", timestep_type="discrete", final_sigmas_type="zero", sigma_min=None,
        sigma_max=None, rescale_betas_zero_snr=False, **SIGMA_FLAGS), True, False),
    "euler_a": (sample_euler_ancestral, EulerAncestralDiscreteScheduler, dict(rescale_betas_zero_snr=False),
                False, True),
    "heun": (sample_heun, HeunDiscreteScheduler, dict(clip_sample=False, **SIGMA_FLAGS), True, False),
    "lms": (sample_lms, LMSDiscreteScheduler, dict(SIGMA_FLAGS), True, False),
    "dpm_2": (sample_dpm_2, KDPM2DiscreteScheduler, dict(SIGMA_FLAGS), True, False),
    "dpm_2_a": (sample_dpm_2_ancestral, KDPM2AncestralDiscreteScheduler, dict(SIGMA_FLAGS), True, True),
}
# (timestep_spacing, our schedule kind). diffusers builds Karras sigmas between its *spaced* sigmas' ends,
# which span the model's whole range (as ours, A1111's and k-diffusion's do) only with linspace spacing.
SCHEDULES = [("leading", "automatic"), ("linspace", "automatic"), ("trailing", "automatic"), ("linspace", "karras")]

CASES = [
    pytest.param(name, steps, pred, spacing, kind, id=f"{name}-{steps}-{pred}-{spacing}-{kind}")
    for name, (_, _, _, karras, _) in SAMPLERS.items()
    for spacing, kind in SCHEDULES
    if karras or kind != "karras"
    for steps in (10, 25)
    for pred in ("epsilon", "v_prediction")
]


pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_scheduler(name: str, pred: str, spacing: str, kind: str):
    _, cls, extra, karras, _ = SAMPLERS[name]
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  trained_betas=None, prediction_type=pred, timestep_spacing=spacing, steps_offset=1, **extra)
    if karras:
        config["use_karras_sigmas"] = kind == "karras"
    return cls(**config)


def run_diffusers(scheduler, unet, context, latents, generator):
    """The standard diffusers loop (after set_timesteps): scale the input, run the UNet at the scheduler's
    timestep, step."""
    kwargs = {"generator": generator} if generator is not None else {}
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(latents, t), t, context)
        latents = scheduler.step(out, t, latents, **kwargs).prev_sample
    return latents


def kdpm2_karras_model(unet, schedule, pred, sampling, context):
    """diffusers' KDPM2 schedulers round the UNet timestep at each Karras sigma, but not at the midpoints:
    so the step evaluations (even calls: one per step, then its midpoint) see rounded grid timesteps and
    the midpoints log-sigma-interpolated ones. (With eta = 1 DPM2 a's midpoint sqrt(sigma_i * sigma_down)
    is sigma_{i+1} itself, so it must not be looked up on the grid.) The sigmas, the solver, are unchanged."""
    at_steps = Denoiser(unet, schedule, pred)
    at_steps.use_timesteps_of(SamplingSchedule(sampling.sigmas, sampling.timesteps.round()))
    at_midpoints = Denoiser(unet, schedule, pred)
    calls = itertools.count()

    def model(x, sigma):
        return (at_midpoints if next(calls) % 2 else at_steps)(x, sigma, context)

    return model


@pytest.mark.parametrize("name, steps, pred, spacing, kind", CASES)
def test_matches_diffusers(unet, context, name, steps, pred, spacing, kind):
    err = parity_error(unet, context, name, steps, pred, spacing, kind)
    assert err <= 1e-4, f"max abs error {err:.2e} x max|ref|"


@torch.inference_mode()
def parity_error(unet, context, name, steps, pred, spacing, kind) -> float:
    """max |ours - diffusers| / max |diffusers| for the final latents."""
    sampler, _, _, _, stochastic = SAMPLERS[name]
    schedule = DiscreteSchedule()
    sampling = sampling_schedule(schedule, steps, kind, spacing)
    if name.startswith("dpm_2") and kind == "karras":
        model = kdpm2_karras_model(unet, schedule, pred, sampling, context)
    else:
        denoiser = Denoiser(unet, schedule, pred)
        denoiser.use_timesteps_of(sampling)

        def model(x_, sigma):
            return denoiser(x_, sigma, context)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = noise * sampling.sigmas[0].item()
    generator = (lambda: torch.Generator().manual_seed(42)) if stochastic else (lambda: None)
    ours = sampler(model, x, sampling.sigmas, generator=generator())

    scheduler = diffusers_scheduler(name, pred, spacing, kind)
    scheduler.set_timesteps(steps)
    start = x if spacing == "leading" else noise * scheduler.init_noise_sigma
    ref = run_diffusers(scheduler, unet, context, start, generator())

    final = ours / math.sqrt(1 + sampling.sigmas[-1].item() ** 2)  # sigmas[-1] = 0: a no-op, kept for form
    return ((final - ref).abs().max() / ref.abs().max()).item()


def test_lms_coefficients_integrate_the_lagrange_basis():
    """Closed form vs the definition: Simpson's rule is exact for these cubics."""
    sigmas = sampling_schedule(DiscreteSchedule(), 12, "karras").sigmas.tolist()
    for i in range(len(sigmas) - 1):
        order = min(i + 1, 4)
        nodes = [sigmas[i - k] for k in range(order)]
        a, b = sigmas[i], sigmas[i + 1]
        for j, c in enumerate(lms_coefficients(sigmas, i, order)):
            def basis(tau, j=j):
                return math.prod((tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j)
            simpson = (b - a) / 6 * (basis(a) + 4 * basis((a + b) / 2) + basis(b))
            assert c == pytest.approx(simpson, rel=1e-10, abs=1e-14)
    # an exact integrator of polynomials: the coefficients sum to the interval length
    assert sum(lms_coefficients(sigmas, 6, 4)) == pytest.approx(sigmas[7] - sigmas[6], rel=1e-12)


# --- the math, on an analytic data model (convergence orders: tests/test_sampler_order.py) --------------

MIX_MEANS = torch.tensor([-1.5, 0.5, 2.0], dtype=torch.float64)
MIX_STD, MIX_WEIGHTS = 0.4, torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Exact E[x0 | x] for x0 ~ sum_k w_k N(m_k, s^2) (1-D, float64) and x = x0 + sigma * eps."""
    var = MIX_STD**2 + float(sigma) ** 2
    log_resp = MIX_WEIGHTS.log() - (x[..., None] - MIX_MEANS) ** 2 / (2 * var)  # (..., K)
    resp = log_resp.softmax(dim=-1)
    post_means = MIX_MEANS + MIX_STD**2 / var * (x[..., None] - MIX_MEANS)  # (..., K)
    return (resp * post_means).sum(-1)


@pytest.mark.parametrize("ancestral, ode", [(sample_euler_ancestral, sample_euler),
                                            (sample_dpm_2_ancestral, sample_dpm_2)])
def test_ancestral_with_eta_zero_is_the_ode_sampler(ancestral, ode):
    x = torch.linspace(-8, 8, 33, dtype=torch.float64)
    sigmas = sampling_schedule(DiscreteSchedule(), 8, "karras").sigmas
    got = ancestral(mixture_denoiser, x, sigmas, eta=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ode(mixture_denoiser, x, sigmas), rtol=0, atol=0)


@pytest.mark.parametrize("sampler", [sample_euler_ancestral, sample_dpm_2_ancestral])
def test_ancestral_samples_have_the_data_distribution(sampler):
    """Ancestral sampling with the exact denoiser draws from the data: mean and variance of the mixture."""
    x = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 14.6
    sigmas = sampling_schedule(DiscreteSchedule(), 200, "karras").sigmas  # Euler a is first order: many steps
    samples = sampler(mixture_denoiser, x * sigmas[0].item() / 14.6, sigmas,
                      generator=torch.Generator().manual_seed(4))
    mean = (MIX_WEIGHTS * MIX_MEANS).sum().item()
    var = (MIX_WEIGHTS * (MIX_MEANS**2 + MIX_STD**2)).sum().item() - mean**2
    assert samples.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / 20000) + 0.02)
    assert samples.var().item() == pytest.approx(var, rel=0.04)  # sampling error alone is ~1%


@pytest.mark.parametrize("sampler", [sample_euler, sample_euler_ancestral, sample_heun, sample_lms,
                                     sample_dpm_2, sample_dpm_2_ancestral])
def test_callback_once_per_step_and_input_untouched(sampler):
    x = torch.linspace(-8, 8, 9, dtype=torch.float64)
    before = x.clone()
    sigmas = sampling_schedule(DiscreteSchedule(), 6, "karras").sigmas
    seen = []
    sampler(mixture_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert [s.index for s in seen] == list(range(6)) and all(s.total == 6 for s in seen)
    assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert torch.equal(seen[0].x, before) and torch.equal(x, before)


@pytest.mark.parametrize("sampler", [sample_euler_ancestral, sample_dpm_2_ancestral])
def test_negative_eta_is_refused(sampler):
    with pytest.raises(InvalidInputError, match="eta"):
        sampler(mixture_denoiser, torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.5, 0.0]), eta=-0.1)
