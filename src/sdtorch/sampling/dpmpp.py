"""The DPM-Solver++ family: DPM++ 2M, 2M SDE, 3M SDE, 2S a and SDE (A1111 names).

DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) integrates the probability-flow ODE in
lambda = -log(sigma) with the data prediction D(x, sigma) ("x0"), where the linear part is exact:

    x(sigma_t) = (sigma_t / sigma_s) x(sigma_s) + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda D dlambda

Holding D constant over a step of h = lambda_t - lambda_s gives the first-order step (DDIM in sigma
space): x_t = r x_s + (1 - r) D with r = sigma_t / sigma_s = e^-h. The higher orders correct D with
finite differences of earlier (multistep, "M") or intermediate (singlestep, "S") evaluations.
The SDE variants (the paper's SDE-DPM-Solver++, with k-diffusion's eta between ODE and SDE) shrink
x by e^-(1+eta)h instead of e^-h and add fresh noise of std sigma_t sqrt(1 - e^-2 eta h), eta = 1
being the reverse SDE and eta = 0 the ODE again. Their noise: for seeded images, A1111's (k-diffusion's Brownian
trees, one per image seed: `SeededNoise.brownian`); from one generator, plain draws (diffusers').

Every step that lands on sigma = 0 returns the denoised estimate (the step is first order there),
as in k-diffusion and diffusers with `final_sigmas_type="zero"`. Scalar step arithmetic is in
float64 Python floats; the model gets the exact float64 sigma it is evaluated at.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import (
    Callback, DenoiseFn, Noise, SeededNoise, ancestral_step, check_eta, randn_like, report, sde_noise, step_input,
)
from .schedules import DiscreteSchedule, SamplingSchedule, grid_at, sampling_schedule


def sample_dpmpp_2m(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second order, one model call per step.

    D is extrapolated linearly in lambda from this step's and the previous step's estimates; the first
    step and a last step to sigma = 0 are first order. Equals diffusers' `DPMSolverMultistepScheduler`
    (dpmsolver++, solver_order 2, midpoint, final_sigmas_type "zero") on the same sigmas.
    Deterministic: `generator`, `eta` and `s_noise` are accepted for the common signature and unused.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    old_denoised = None
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            d = denoised
            if old_denoised is not None:
                d = d + _slope(sig, i, denoised, old_denoised) / 2  # D at the step's lambda midpoint
            ratio = sig[i + 1] / sig[i]
            x = ratio * x + (1 - ratio) * d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint type (Lu et al. 2022, appendix; k-diffusion `sample_dpmpp_2m_sde`).

    eta (default 1) scales the injected noise; eta = 0 is exactly DPM++ 2M. Noise is one
    `randn_like(x, generator)` per step that does not end at 0, in step order: at eta = 1 this is the
    stream diffusers' `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")` draws from the same
    generator (its last draw, on the step to 0, is multiplied by zero). Seeded images draw A1111's Brownian-tree
    noise instead (`sde_noise`): the same distribution, A1111's realisation.
    """
    eta = check_eta(eta, default=1.0)
    sig = sigmas.tolist()
    n = len(sig) - 1
    old_denoised = None
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])
            d = denoised
            if old_denoised is not None:
                d = d + _slope(sig, i, denoised, old_denoised) / 2
            x = math.exp(-(1 + eta) * h) * x - math.expm1(-(1 + eta) * h) * d
            if eta > 0:
                noise = sde_noise(x, generator, sig[i], sig[i + 1])
                x = x + noise * (sig[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        old_denoised = denoised
    return x


def sample_dpmpp_3m_sde(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion `sample_dpmpp_3m_sde`): D is extrapolated quadratically in lambda
    from the last three estimates (first and second order on the first two steps).

    eta (default 1) scales the noise, one `randn_like(x, generator)` per step that does not end at 0;
    eta = 0 gives the deterministic third-order multistep ODE solver (DPM-Solver++(3M)).

    One deliberate difference from k-diffusion (and DPM-Solver's and diffusers' third-order multistep):
    the second difference d2 approximates h^2 D''/2, whose exact weight is -2 phi_3, not -phi_3. With
    -phi_3 a step's local error is O(h^3) and the method only second order; with -2 phi_3 it is O(h^4).
    """
    eta = check_eta(eta, default=1.0)
    sig = sigmas.tolist()
    n = len(sig) - 1
    history: list[tuple[Tensor, float]] = []  # (denoised, lambda) of earlier steps, newest first
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            lam, h = -math.log(sig[i]), math.log(sig[i] / sig[i + 1])
            h_eta = (1 + eta) * h
            phi_2 = math.expm1(-h_eta) / h_eta + 1  # = integral_0^H e^(v-H) v dv / H, H = h_eta
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            if len(history) >= 2:
                (d_1, lam_1), (d_2, lam_2) = history[:2]
                r0, r1 = (lam - lam_1) / h, (lam_1 - lam_2) / h  # previous step lengths in units of h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1  # first differences, per h
                d2 = (d1_0 - d1_1) / (r0 + r1)  # second difference
                d1 = d1_0 + r0 * d2  # first difference at this step's lambda
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - 2 * phi_3 * d2  # -2 phi_3 = integral_0^H e^(v-H) v^2 dv / H^2, H = h_eta
            elif history:
                d_1, lam_1 = history[0]
                x = x + phi_2 * (denoised - d_1) * (h / (lam - lam_1))
            if eta > 0:
                noise = sde_noise(x, generator, sig[i], sig[i + 1])
                x = x + noise * (sig[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        history = [(denoised, -math.log(sig[i])), *history[:1]]
    return x


def sample_dpmpp_2s_ancestral(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) ancestral (Lu et al. 2022, Algorithm 1 with r = 1/2; k-diffusion
    `sample_dpmpp_2s_ancestral`): a second-order singlestep to sigma_down through the lambda midpoint
    (two model calls), then noise of std sigma_up (`common.ancestral_step`). eta defaults to 1;
    eta = 0 is the deterministic DPM-Solver++(2S). Noise: `randn_like(x, generator)` once a step.
    """
    eta = check_eta(eta, default=1.0)
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        sigma_down, sigma_up = (float(s) for s in ancestral_step(sigmas[i], sigmas[i + 1], eta))
        if sigma_down == 0:  # an Euler step to sigma 0 lands on the denoised estimate
            x = denoised
        else:
            sigma_mid = math.sqrt(sig[i] * sigma_down)  # lambda halfway between sigmas[i] and sigma_down
            x_mid = _first_order(x, denoised, sig[i], sigma_mid)
            denoised_mid = model(x_mid, sigmas.new_tensor(sigma_mid))
            x = _first_order(x, denoised_mid, sig[i], sigma_down)
        if sig[i + 1] > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def sample_dpmpp_sde(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2S) as an SDE solver (k-diffusion `sample_dpmpp_sde`, r = 1/2): an ancestral
    first-order step to the lambda midpoint, a model call there, then an ancestral step over the whole
    interval with D taken at the midpoint. eta (default 1) scales the noise; eta = 0 is the deterministic
    DPM-Solver++(2S).

    The two noise draws of a step are increments of one Brownian motion W indexed by sigma, over
    [sigma_mid, sigma] and [sigma_next, sigma] (normalised): for seeded images, queries of A1111's per-image
    Brownian trees (torchsde, as k-diffusion); from one generator, plain Gaussians correlated the same way
    (`_brownian_increments`): the same distribution, another realisation, not shared between runs with
    different step counts.
    """
    eta = check_eta(eta, default=1.0)
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_mid = math.sqrt(sig[i] * sig[i + 1])  # lambda halfway
        if eta > 0:
            z_mid, z_next = _brownian_increments(x, generator, sig[i], sigma_mid, sig[i + 1])
        down, up = (float(s) for s in ancestral_step(sigma, sigma.new_tensor(sigma_mid), eta))
        x_mid = _first_order(x, denoised, sig[i], down)
        if eta > 0:
            x_mid = x_mid + z_mid * (s_noise * up)
        denoised_mid = model(x_mid, sigmas.new_tensor(sigma_mid))
        down, up = (float(s) for s in ancestral_step(sigma, sigma_next, eta))
        x = _first_order(x, denoised_mid, sig[i], down)
        if eta > 0:
            x = x + z_next * (s_noise * up)
    return x


def multistep_schedule(
    schedule: DiscreteSchedule,
    steps: int,
    kind: str = "automatic",
    spacing: str = "leading",
    steps_offset: int = 1,
) -> SamplingSchedule:
    """The timestep grid of diffusers' `DPMSolverMultistepScheduler` (UniPC and DEIS space theirs the same
    way), which differs from `sampling_schedule`'s (that of Euler and DDIM):

    automatic / uniform: `steps + 1` integer timesteps over [0, T), the last one dropped: leading steps by
        T // (steps + 1) (then adds steps_offset), linspace rounds; trailing is the same as Euler's.
    karras / exponential: the same sigmas; the UNet gets their timesteps rounded (Karras) or truncated
        (exponential) to integers, as diffusers does.
    """
    grid = sampling_schedule(schedule, steps, kind, spacing, steps_offset)  # validates the arguments
    if kind in ("karras", "exponential"):
        timesteps = grid.timesteps.round() if kind == "karras" else grid.timesteps.floor()
        return SamplingSchedule(grid.sigmas, timesteps)
    if kind == "automatic" and spacing == "trailing":
        return grid
    T = schedule.num_train_timesteps
    if kind == "uniform" or spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    else:  # leading
        timesteps = (torch.arange(steps + 1, dtype=torch.float64) * (T // (steps + 1))).flip(0)[:-1] + steps_offset
    return grid_at(schedule, timesteps)


def _slope(sig: list[float], i: int, denoised: Tensor, old_denoised: Tensor) -> Tensor:
    """(D_i - D_{i-1}) * h_i / h_{i-1}: the change of D over this step's lambda length, extrapolated."""
    h, h_last = math.log(sig[i] / sig[i + 1]), math.log(sig[i - 1] / sig[i])
    return (denoised - old_denoised) * (h / h_last)


def _first_order(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """DPM-Solver++(1) from sigma to sigma_to with D held constant (DDIM in sigma space)."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * denoised


def _brownian_increments(
    x: Tensor, generator: Noise | None, sigma: float, sigma_mid: float, sigma_next: float
) -> tuple[Tensor, Tensor]:
    """Normalised increments (W(sigma_mid) - W(sigma)) / sqrt(sigma - sigma_mid) and
    (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next) of a Brownian motion W: two N(0, I) tensors
    with correlation sqrt((sigma - sigma_mid) / (sigma - sigma_next)), built from two independent draws."""
    if isinstance(generator, SeededNoise):  # A1111's Brownian trees answer both
        return generator.brownian(x, sigma, sigma_mid), generator.brownian(x, sigma, sigma_next)
    first, rest = sigma - sigma_mid, sigma_mid - sigma_next
    z_first = randn_like(x, generator)  # the increment over [sigma_mid, sigma], normalised
    z_rest = randn_like(x, generator)  # over [sigma_next, sigma_mid], independent of it
    z_whole = (math.sqrt(first) * z_first + math.sqrt(rest) * z_rest) / math.sqrt(first + rest)
    return z_first, z_whole
