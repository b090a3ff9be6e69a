"""The timestep samplers: DDIM, PLMS, DDPM, UniPC and LCM, in sigma space, with their diffusers grids.

These samplers come from the variance-preserving (VP) world, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at
integer timesteps. With sigma = sqrt((1 - abar) / abar), i.e. abar = 1 / (1 + sigma^2), the VP latent is
x_t = x / sqrt(1 + sigma^2) for x = x0 + sigma * eps, and each of their updates, divided by sqrt(abar_next),
is an update of x. So they share the k-diffusion signature: they walk `sigmas` (n + 1,) and return x at
sigmas[-1] (the driver divides by sqrt(1 + sigmas[-1]^2) for the VP latent).

Grids. diffusers runs these schedulers at their own integer timesteps; the `*_schedule` builders below
return those grids as `SamplingSchedule`s (same call as `sampling_schedule`, for the registry):
    DDIM / PLMS  `ddim_schedule`   timesteps as DDIMScheduler / PNDMScheduler space them (linspace rounded),
                                   last sigma = sigma_min (abar[0], set_alpha_to_one=False) or 0 (True).
    DDPM         `ddpm_schedule`   the same timesteps, last sigma 0.
    UniPC        `unipc_schedule`  UniPCMultistepScheduler's timesteps (n + 1 spaced, the last dropped;
                                   Karras: UNet timesteps rounded), last sigma 0.
    LCM          `lcm_schedule`    LCMScheduler's subset of its 50-step distillation grid, last sigma 0.
diffusers' DDIM and PNDM step from t to t - T // n (not to the next listed timestep) and then evaluate at
the next listed timestep without rescaling the latent. With `leading` spacing, and `trailing` when n
divides T, that is the next listed timestep; otherwise (`linspace`) no sigma list reproduces it: here the
step goes to the next listed timestep, as in the DDIM paper's sub-sequence and CompVis' DDIMSampler.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .common import Callback, DenoiseFn, Noise, ancestral_step, check_eta, randn_like, report, step_input
from .schedules import DiscreteSchedule, SamplingSchedule, check_steps, grid_at, sampling_schedule

# Adams-Bashforth weights of PLMS (PNDM eq. 12 and its lower-order warm-up), newest prediction first
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
LCM_SIGMA_DATA = 0.5  # consistency-model boundary scalings (Song et al. 2023, eq. 7), as LCMScheduler
LCM_TIMESTEP_SCALING = 10.0


def sample_ddim(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12, with sigma_t of eq. 16 scaled by eta; eta defaults to 0).

    Eq. 12 divided by sqrt(abar_next) reads, for sigma -> sigma' and eps = (x - x0) / sigma,
        x' = x0 + sqrt(sigma'^2 - sigma_up^2) * eps + sigma_up * z,
        sigma_up = eta * sigma' * sqrt(1 - sigma'^2 / sigma^2)
    (k-diffusion's ancestral step; eta = 0 is Euler's method in sigma). z is drawn from `generator`
    on every step with sigma_up > 0, as DDIMScheduler draws it; `s_noise` scales it.
    """
    eta = check_eta(eta, default=0.0)
    n = len(sigmas) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        x = _ddim_step(x, denoised, sigmas[i], sigmas[i + 1], eta, s_noise, generator)
    return x


def sample_ddpm(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) on the timesteps of `sigmas`.

    Each step draws from the posterior q(x_prev | x_t, x0) (eq. 6-7) with its variance beta-tilde
    (diffusers' "fixed_small"). That posterior is exactly DDIM's eq. 12 with eta = 1 (Song et al. 2020,
    sec. 4.1), so this is `sample_ddim` with eta defaulting to 1. The last step, to sigma = 0, adds no noise.
    """
    eta = check_eta(eta, default=1.0)
    return sample_ddim(model, x, sigmas, generator=generator, callback=callback, eta=eta, s_noise=s_noise)


def sample_plms(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """PLMS, PNDM's pseudo linear multistep method (Liu et al. 2022, eq. 11-12), as diffusers'
    `PNDMScheduler(skip_prk_steps=True)` runs it.

    Every step is the deterministic DDIM transfer x' = x + (sigma' - sigma) * eps (PNDM eq. 11) with eps an
    Adams-Bashforth combination of the last (up to 4) model predictions. Warm-up, as diffusers: step 0 is
    a trapezoid step (Euler to sigma_1, evaluate there, redo the step with the mean of the two
    predictions); step 1 evaluates at sigma_1 again, on the corrected x, and combines that with step 0's
    first prediction (2nd order); steps 2 and 3 use 3rd and 4th order. n steps cost n + 1 model calls.

    diffusers combines the model's raw outputs: for a model whose `prediction_type` attribute is
    "v_prediction" the v predictions are combined (then turned into eps with the current x), else eps.
    Deterministic: `generator`, `eta` and `s_noise` are accepted for the common signature and unused.
    """
    v_model = getattr(model, "prediction_type", "epsilon") == "v_prediction"
    sig = sigmas.tolist()
    n = len(sig) - 1
    history: list[Tensor] = []  # raw predictions (eps or v) of the previous steps, oldest first
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        pred = _prediction(x, denoised, sig[i], v_model)
        if i == 0 and n > 1:  # trapezoid warm-up; only the first prediction enters the history
            x_euler = x + (sig[1] - sig[0]) * _eps(pred, x, sig[0], v_model)
            pred_end = _prediction(x_euler, model(x_euler, sigmas[1]), sig[1], v_model)
            history, pred = [pred], (pred + pred_end) / 2
        else:
            history = [*history[-3:], pred]
            pred = sum(w * p for w, p in zip(ADAMS_BASHFORTH[len(history)], reversed(history)))
        x = x + (sig[i + 1] - sig[i]) * _eps(pred, x, sig[i], v_model)
    return x


def sample_unipc(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """UniPC (Zhao et al. 2023): predictor UniP-2 and corrector UniC on the data prediction, B(h) = e^h - 1
    ("bh2"), as diffusers' `UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True,
    lower_order_final=True, disable_corrector=[])`.

    With lambda = -log(sigma), h = lambda' - lambda and phi = 1 - e^-h, a step (Algorithm 1-2, in sigma space)
        x' = (sigma' / sigma) x + phi * (m + sum_k rho_k D_k),   D_k = (m_k - m) / r_k,
    with m the x0 estimate at x and r_k = (lambda_k - lambda) / h. The predictor uses the previous step's
    estimate (order 2, rho = 1/2; order 1 on the first and the last step). Once the model has been
    evaluated at the predicted point, the corrector redoes the previous step with that estimate too
    (rho solved from the bh2 conditions): no extra model call, the last step is not corrected.
    Deterministic: `generator`, `eta` and `s_noise` are accepted for the common signature and unused.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    estimates: list[Tensor] = []  # x0 estimates at the uncorrected points, one per step
    orders: list[int] = []
    x_before = x
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        estimates.append(denoised)
        if i > 0:  # UniC: redo step i - 1 now that its end point has an estimate
            x = _unipc_update(x_before, sig, i - 1, estimates, orders[-1], corrector=True)
        report(callback, i, n, sigmas[i], x, denoised)
        orders.append(min(2, i + 1, n - i))
        x_before = x
        x = _unipc_update(x, sig, i, estimates, orders[-1], corrector=False)
    return x


def sample_lcm(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 1), as diffusers' LCMScheduler.

    The consistency function is f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t) on the VP latent
    x_t = x / sqrt(1 + sigma^2), with c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2),
    sd = 0.5, at the UNet timestep t = model.timestep(sigma). Between steps f is noised afresh to the next
    sigma (x' = f + sigma' z, z from `generator`, scaled by `s_noise`); the last step returns f itself
    when sigmas[-1] = 0. `eta` is unused.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        c_skip, c_out = _lcm_scalings(float(model.timestep(sigmas[i : i + 1])))
        x = step_input(model, i, x)
        denoised = c_out * model(x, sigmas[i]) + c_skip * (x / math.sqrt(1 + sig[i] ** 2))
        report(callback, i, n, sigmas[i], x, denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + randn_like(x, generator) * (s_noise * sig[i + 1])
    return x


def ddim_schedule(
    schedule: DiscreteSchedule,
    steps: int,
    kind: str = "automatic",
    spacing: str = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
) -> SamplingSchedule:
    """The grid of DDIMScheduler / PNDMScheduler (DDIM, PLMS): integer timesteps at `spacing`, and a last
    sigma of sigma_min (abar[0], SD's `set_alpha_to_one=False`) or 0. Other kinds: `sampling_schedule`'s."""
    if kind not in ("automatic", "uniform"):
        return sampling_schedule(schedule, steps, kind, spacing, steps_offset)
    final = 0.0 if set_alpha_to_one else schedule.sigma_min
    return _integer_grid(schedule, steps, "linspace" if kind == "uniform" else spacing, steps_offset, final)


def ddpm_schedule(
    schedule: DiscreteSchedule,
    steps: int,
    kind: str = "automatic",
    spacing: str = "leading",
    steps_offset: int = 1,
) -> SamplingSchedule:
    """The grid of DDPMScheduler: integer timesteps at `spacing`, last sigma 0. Other kinds: `sampling_schedule`'s."""
    if kind not in ("automatic", "uniform"):
        return sampling_schedule(schedule, steps, kind, spacing, steps_offset)
    return _integer_grid(schedule, steps, "linspace" if kind == "uniform" else spacing, steps_offset, 0.0)


def unipc_schedule(
    schedule: DiscreteSchedule,
    steps: int,
    kind: str = "automatic",
    spacing: str = "leading",
    steps_offset: int = 1,
) -> SamplingSchedule:
    """The grid of UniPCMultistepScheduler, last sigma 0.

    automatic: linspace / leading space n + 1 timesteps and drop the last (leading: ratio T // (n + 1)),
    trailing spaces n. karras / exponential: the sigmas of `sampling_schedule` over the whole range, UNet
    timesteps rounded (karras) or truncated (exponential) to integers, as diffusers casts them.
    """
    if kind == "uniform":
        kind, spacing = "automatic", "linspace"
    if kind == "automatic":
        check_steps(schedule, steps)
        spaced = schedule.timesteps(steps if spacing == "trailing" else steps + 1, spacing, steps_offset)
        timesteps = spaced.round()[:steps]  # (n,)
        return grid_at(schedule, timesteps)
    grid = sampling_schedule(schedule, steps, kind, spacing, steps_offset)
    to_int = torch.round if kind == "karras" else torch.trunc
    return SamplingSchedule(grid.sigmas, to_int(grid.timesteps))


def lcm_schedule(
    schedule: DiscreteSchedule,
    steps: int,
    kind: str = "automatic",
    spacing: str = "leading",
    steps_offset: int = 1,
    original_steps: int = 50,
) -> SamplingSchedule:
    """The grid of LCMScheduler: every (original_steps / n)-th timestep, from T - 1 down, of the distillation
    grid k - 1, 2k - 1, ..., T - 1 (k = T // original_steps); last sigma 0. `spacing` and `steps_offset` do
    not apply (LCMScheduler ignores them); kinds other than automatic: `sampling_schedule`'s."""
    if kind != "automatic":
        return sampling_schedule(schedule, steps, kind, spacing, steps_offset)
    if not isinstance(steps, int) or not 1 <= steps <= original_steps:
        raise InvalidInputError(f"LCM takes 1..{original_steps} steps (its distillation grid), not {steps!r}")
    k = schedule.num_train_timesteps // original_steps
    grid = torch.arange(original_steps, 0, -1, dtype=torch.float64) * k - 1  # (original_steps,) descending
    index = (torch.arange(steps, dtype=torch.float64) * (original_steps / steps)).floor().long()  # as np.linspace
    timesteps = grid[index]  # (n,)
    return grid_at(schedule, timesteps)


def _integer_grid(
    schedule: DiscreteSchedule, steps: int, spacing: str, steps_offset: int, final_sigma: float
) -> SamplingSchedule:
    check_steps(schedule, steps)
    timesteps = schedule.timesteps(steps, spacing, steps_offset).round()  # (n,) integers, as diffusers casts them
    return grid_at(schedule, timesteps, final_sigma)


def _ddim_step(
    x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float, s_noise: float,
    generator: Noise | None,
) -> Tensor:
    sigma_down, sigma_up = (float(s) for s in ancestral_step(sigma, sigma_next, eta))
    x = denoised + (x - denoised) * (sigma_down / float(sigma))
    if sigma_up > 0:
        x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def _prediction(x: Tensor, denoised: Tensor, sigma: float, v_model: bool) -> Tensor:
    """The raw prediction a UNet of that parameterisation made: eps, or v = (eps - sigma x0) / sqrt(1 + sigma^2)."""
    eps = (x - denoised) / sigma
    return (eps - sigma * denoised) / math.sqrt(1 + sigma**2) if v_model else eps


def _eps(pred: Tensor, x: Tensor, sigma: float, v_model: bool) -> Tensor:
    """eps from a (combined) raw prediction at x: for v, eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    return (pred + sigma * x / math.sqrt(1 + sigma**2)) / math.sqrt(1 + sigma**2) if v_model else pred


def _unipc_update(x: Tensor, sig: list[float], i: int, estimates: list[Tensor], order: int, corrector: bool) -> Tensor:
    """One UniPC step from sig[i] to sig[i + 1] with estimates[i] at x (UniP; UniC adds estimates[i + 1])."""
    ratio = sig[i + 1] / sig[i]  # e^-h
    phi = 1 - ratio
    m = estimates[i]
    correction = 0.0
    if order == 2:  # one earlier estimate
        h = math.log(sig[i] / sig[i + 1])
        r = math.log(sig[i] / sig[i - 1]) / h
        d = (estimates[i - 1] - m) / r
        if corrector:  # solve [[1, 1], [r, 1]] rho = b for the bh2 b_1, b_2
            b1 = 1 / phi - 1 / h
            b2 = (1 - 2 * (1 - phi / h) / h) / phi
            rho_prev = (b1 - b2) / (1 - r)
            correction = rho_prev * d + (b1 - rho_prev) * (estimates[i + 1] - m)
        else:
            correction = 0.5 * d
    elif corrector:
        correction = 0.5 * (estimates[i + 1] - m)
    return ratio * x + phi * (m + correction)


def _lcm_scalings(timestep: float) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency parameterisation at a UNet timestep."""
    scaled = LCM_TIMESTEP_SCALING * timestep
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + LCM_SIGMA_DATA**2)
    return c_skip, c_out
