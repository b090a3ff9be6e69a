"""DDIM, PLMS, DDPM, UniPC and LCM against diffusers' schedulers, on a real (tiny, random) UNet.

Parity setup: the same UNet runs under our sampler + Denoiser (sigma space, on the grid our `*_schedule`
builder makes) and under the diffusers scheduler's standard loop; final VP latents (ours divided by
sqrt(1 + sigmas[-1]^2)) must agree within 1e-4 of max|reference|.

Starting point: these schedulers keep VP latents x_t and start from pure noise (init_noise_sigma = 1),
which in sigma space is noise * sqrt(1 + sigma_max^2), not our noise * sigma_max. diffusers is started
from the VP form of our x (x / sqrt(1 + sigmas[0]^2)): what is compared is the solver.

Noise: DDIM (eta > 0), DDPM and LCM draw one randn(x.shape) per noisy step from the generator, in the
same order as diffusers (DDIMScheduler and DDPMScheduler also draw on a last step whose noise is 0 or
1e-10: nothing is drawn after it), so with identically seeded CPU generators the comparison is exact.

Spacings: DDIMScheduler and PNDMScheduler step from t to t - T // n, then evaluate at the next listed
timestep. With `leading`, and `trailing` for n = 10 and 25 (which divide T), that is the next timestep;
with `linspace` it is not, and no sigma list reproduces it (see timestep_samplers' docstring). For
linspace, `test_ddim_linspace_step_by_step` checks our step at diffusers' timesteps, re-creating its
relabelling of the latent outside the sampler.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler

from sdtorch.errors import InvalidInputError
from sdtorch.sampling.denoiser import Denoiser
from sdtorch.sampling.schedules import DiscreteSchedule, SamplingSchedule
from sdtorch.sampling.timestep_samplers import (
    ddim_schedule,
    ddpm_schedule,
    lcm_schedule,
    sample_ddim,
    sample_ddpm,
    sample_lcm,
    sample_plms,
    sample_unipc,
    unipc_schedule,
)

SHAPE = (1, 4, 8, 8)
REFERENCE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 trained_betas=None, steps_offset=1)
NO_CLIP = dict(clip_sample=False, thresholding=False)


def ddim_reference(pred, spacing, kind, set_alpha_to_one=False):
    return DDIMScheduler(**REFERENCE, **NO_CLIP, prediction_type=pred, timestep_spacing=spacing,
                         set_alpha_to_one=set_alpha_to_one, rescale_betas_zero_snr=False)


def pndm_reference(pred, spacing, kind):
    return PNDMScheduler(**REFERENCE, prediction_type=pred, timestep_spacing=spacing, skip_prk_steps=True,
                         set_alpha_to_one=False)


def ddpm_reference(pred, spacing, kind):
    return DDPMScheduler(**REFERENCE, **NO_CLIP, prediction_type=pred, timestep_spacing=spacing,
                         variance_type="fixed_small", rescale_betas_zero_snr=False)


def unipc_reference(pred, spacing, kind):
    return UniPCMultistepScheduler(
        **REFERENCE, prediction_type=pred, timestep_spacing=spacing, solver_order=2, solver_type="bh2",
        predict_x0=True, lower_order_final=True, disable_corrector=[], solver_p=None, thresholding=False,
        use_karras_sigmas=kind == "karras", use_exponential_sigmas=False, use_beta_sigmas=False,
        use_flow_sigmas=False, final_sigmas_type="zero", rescale_betas_zero_snr=False)


def lcm_reference(pred, spacing, kind):
    return LCMScheduler(**REFERENCE, **NO_CLIP, prediction_type=pred, timestep_spacing=spacing,
                        original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=True,
                        rescale_betas_zero_snr=False)


# name: (our sampler, our grid builder, diffusers scheduler, its schedules (spacing, kind), step counts, draws noise)
SAMPLERS = {
    "ddim": (sample_ddim, ddim_schedule, ddim_reference, [("leading", "automatic"), ("trailing", "automatic")],
             (10, 25), False),
    "plms": (sample_plms, ddim_schedule, pndm_reference, [("leading", "automatic"), ("trailing", "automatic")],
             (10, 25), False),
    "ddpm": (sample_ddpm, ddpm_schedule, ddpm_reference,
             [("leading", "automatic"), ("linspace", "automatic"), ("trailing", "automatic")], (10, 25), True),
    # diffusers' UniPC Karras sigmas span the whole range whatever the spacing, as ours
    "unipc": (sample_unipc, unipc_schedule, unipc_reference,
              [("leading", "automatic"), ("linspace", "automatic"), ("trailing", "automatic"),
               ("leading", "karras")], (10, 25), False),
    "lcm": (sample_lcm, lcm_schedule, lcm_reference, [("leading", "automatic")], (4, 8), True),
}
CASES = [
    pytest.param(name, steps, pred, spacing, kind, eta, id=f"{name}-{steps}-{pred}-{spacing}-{kind}-eta{eta}")
    for name, (_, _, _, schedules, step_counts, _) in SAMPLERS.items()
    for spacing, kind in schedules
    for steps in step_counts
    for pred in ("epsilon", "v_prediction")
    for eta in ((None, 0.7) if name == "ddim" else (None,))
]


class Model:
    """The denoiser with its context fixed, as the sampler registry hands it to samplers."""

    def __init__(self, denoiser: Denoiser, context: torch.Tensor):
        self.denoiser, self.context = denoiser, context
        self.prediction_type = denoiser.prediction_type

    def __call__(self, x, sigma):
        return self.denoiser(x, sigma, self.context)

    def timestep(self, sigma):
        return self.denoiser.timestep(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1))


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(unet, context, pred: str, grid: SamplingSchedule) -> Model:
    denoiser = Denoiser(unet, DiscreteSchedule(), pred)
    denoiser.use_timesteps_of(grid)
    return Model(denoiser, context)


def start(grid: SamplingSchedule) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * grid.sigmas[0].float()


def to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
    return x / math.sqrt(1 + float(sigma) ** 2)


def run_diffusers(scheduler, unet, context, latents, **step_kwargs):
    """The standard diffusers loop (set_timesteps already called)."""
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(latents, t), t, context)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
    return latents


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= rel, f"max relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("name, steps, pred, spacing, kind, eta", CASES)
@torch.inference_mode()
def test_matches_diffusers(unet, context, name, steps, pred, spacing, kind, eta):
    sampler, build, reference, _, _, stochastic = SAMPLERS[name]
    grid = build(DiscreteSchedule(), steps, kind, spacing)
    scheduler = reference(pred, spacing, kind)
    scheduler.set_timesteps(steps)
    if name != "plms":  # PNDM lists its warm-up timestep twice
        assert torch.equal(grid.timesteps.long(), scheduler.timesteps.long()), "not diffusers' timesteps"
    x = start(grid)
    noisy = stochastic or bool(eta)
    ours = sampler(make_model(unet, context, pred, grid), x, grid.sigmas, eta=eta,
                   generator=torch.Generator().manual_seed(11) if noisy else None)
    kwargs = dict(generator=torch.Generator().manual_seed(11)) if noisy else {}
    if eta is not None:
        kwargs["eta"] = eta
    ref = run_diffusers(scheduler, unet, context, to_vp(x, grid.sigmas[0]), **kwargs)
    assert_close(to_vp(ours, grid.sigmas[-1]), ref)


@torch.inference_mode()
def test_ddim_set_alpha_to_one(unet, context):
    """set_alpha_to_one=True: the last step goes to sigma 0 instead of sigma_min."""
    grid = ddim_schedule(DiscreteSchedule(), 10, "automatic", "leading", set_alpha_to_one=True)
    assert grid.sigmas[-1] == 0
    scheduler = ddim_reference("epsilon", "leading", "automatic", set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    x = start(grid)
    ours = sample_ddim(make_model(unet, context, "epsilon", grid), x, grid.sigmas)
    assert_close(ours, run_diffusers(scheduler, unet, context, to_vp(x, grid.sigmas[0])))


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@torch.inference_mode()
def test_ddim_linspace_step_by_step(unet, context, steps, pred):
    """With linspace spacing DDIMScheduler steps from t to t - T // n and then treats the latent as being at
    the next listed timestep. One-step calls of our DDIM to t - T // n, plus that relabelling, reproduce it."""
    schedule = DiscreteSchedule()
    grid = ddim_schedule(schedule, steps, "automatic", "linspace")
    scheduler = ddim_reference(pred, "linspace", "automatic")
    scheduler.set_timesteps(steps)
    assert torch.equal(grid.timesteps.long(), scheduler.timesteps)
    model = make_model(unet, context, pred, grid)
    x = start(grid)
    ref = run_diffusers(scheduler, unet, context, to_vp(x, grid.sigmas[0]))
    for i, t in enumerate(grid.timesteps.long().tolist()):
        prev = t - 1000 // steps
        sigma_to = schedule.sigmas[prev] if prev >= 0 else torch.tensor(schedule.sigma_min, dtype=torch.float64)
        x = sample_ddim(model, x, torch.stack([grid.sigmas[i], sigma_to]))
        x = to_vp(x, sigma_to) * math.sqrt(1 + float(grid.sigmas[i + 1]) ** 2)  # relabel as diffusers does
    assert_close(to_vp(x, grid.sigmas[-1]), ref)


@torch.inference_mode()
def test_lcm_boundary_scalings_at_small_timesteps(unet, context):
    """At t = 1 the consistency skip term is 2.5e-3 of the sample: custom timesteps make c_skip visible."""
    schedule = DiscreteSchedule()
    timesteps = torch.tensor([999.0, 499.0, 99.0, 1.0], dtype=torch.float64)
    grid = SamplingSchedule(torch.cat([schedule.t_to_sigma(timesteps), torch.zeros(1, dtype=torch.float64)]),
                            timesteps)
    scheduler = lcm_reference("epsilon", "leading", "automatic")
    scheduler.set_timesteps(timesteps=[999, 499, 99, 1])
    x = start(grid)
    ours = sample_lcm(make_model(unet, context, "epsilon", grid), x, grid.sigmas,
                      generator=torch.Generator().manual_seed(5))
    ref = run_diffusers(scheduler, unet, context, to_vp(x, grid.sigmas[0]),
                        generator=torch.Generator().manual_seed(5))
    assert_close(ours, ref)


def test_ddpm_is_ddim_with_eta_one():
    """Same posterior: with the same generator seed the two give the same samples (and DDIM's default eta is 0)."""
    sigmas = ddpm_schedule(DiscreteSchedule(), 5).sigmas

    def model(x, sigma):
        return 0.5 * x

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    a = sample_ddpm(model, x, sigmas, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(model, x, sigmas, generator=torch.Generator().manual_seed(1), eta=1.0)
    c = sample_ddim(model, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", [sample_ddim, sample_ddpm, sample_plms, sample_unipc, sample_lcm])
def test_callback_and_no_in_place_edits(sampler):
    schedule = DiscreteSchedule()
    grid = unipc_schedule(schedule, 6)

    class Model:
        def __call__(self, x, sigma):
            return x / (1 + float(sigma) ** 2)  # exact x0 estimate for unit Gaussian data

        def timestep(self, sigma):
            return schedule.sigma_to_t(torch.as_tensor(sigma).reshape(-1))

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(grid.sigmas[0])
    before = x.clone()
    steps = []
    out = sampler(Model(), x, grid.sigmas, generator=torch.Generator().manual_seed(1), callback=steps.append)
    assert torch.equal(x, before)
    assert [s.index for s in steps] == list(range(6)) and all(s.total == 6 for s in steps)
    assert [s.sigma for s in steps] == pytest.approx(grid.sigmas[:-1].tolist())
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_arguments():
    schedule = DiscreteSchedule()
    sigmas = ddim_schedule(schedule, 3).sigmas
    x = torch.zeros(SHAPE)
    for sampler in (sample_ddim, sample_ddpm):
        with pytest.raises(InvalidInputError, match="eta"):
            sampler(lambda x, sigma: x, x, sigmas, eta=-0.1)
    for build in (ddim_schedule, ddpm_schedule, unipc_schedule):
        with pytest.raises(InvalidInputError, match="steps"):
            build(schedule, 0)
        with pytest.raises(InvalidInputError, match="steps"):
            build(schedule, 1001)
    with pytest.raises(InvalidInputError, match="LCM"):
        lcm_schedule(schedule, 51)
