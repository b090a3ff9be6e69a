"""The k-diffusion family: Euler, Euler a, Heun, LMS, DPM2, DPM2 a.

All of them integrate the probability-flow ODE of Karras et al. 2022 (eq. 4, with s(t) = 1, sigma(t) = t),
    dx/dsigma = (x - D(x, sigma)) / sigma,
in "sigma space" (x = x0 + sigma * eps), walking `sigmas` (n + 1,) from sigmas[0] down to sigmas[-1];
the ancestral ones step down to sigma_down and add fresh noise to come back up to the next sigma
(`common.ancestral_step`). Scalar step arithmetic is done in float64 Python floats; the model always
gets the exact float64 sigma it is evaluated at, so a `Denoiser` can find the schedule's own timestep.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import Callback, DenoiseFn, Noise, ancestral_step, check_eta, randn_like, report, step_input, to_d

LMS_ORDER = 4  # derivatives LMS interpolates (k-diffusion's and diffusers' default)


def sample_euler(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler's method on the ODE (Karras et al. 2022, Algorithm 2 without churn, first order only).

    Deterministic: `generator`, `eta` and `s_noise` are accepted for the common signature and unused.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        x = x + to_d(x, sig[i], denoised) * (sig[i + 1] - sig[i])
    return x


def sample_euler_ancestral(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`): an Euler step to sigma_down, then fresh noise of
    std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_{i+1}^2; eta = 1 (the default) is the ancestral
    sampling of DDPM (Ho et al. 2020, Algorithm 2) written in sigma space."""
    eta = check_eta(eta, default=1.0)
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        sigma_down, sigma_up = (float(s) for s in ancestral_step(sigmas[i], sigmas[i + 1], eta))
        x = x + to_d(x, sig[i], denoised) * (sigma_down - sig[i])
        if sig[i + 1] > 0:  # no noise is drawn on a last step to sigma = 0
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def sample_heun(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): Euler predictor, trapezoidal corrector.

    A step to sigma = 0 is plain Euler (the derivative is undefined there). Deterministic: `generator`,
    `eta` and `s_noise` are unused.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        d = to_d(x, sig[i], denoised)
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt  # Euler prediction at sigmas[i + 1]
            d_2 = to_d(x_2, sig[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) * (dt / 2)
    return x


def sample_lms(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Linear multistep (Adams-Bashforth on a non-uniform grid): the derivatives at the last 4 sigmas
    are interpolated by a polynomial in sigma, which is integrated exactly over [sigma_i, sigma_{i+1}]
    (k-diffusion `sample_lms`, diffusers' LMSDiscreteScheduler; order 4, ramping up 1, 2, 3, 4 over the
    first steps).
    Deterministic: `generator`, `eta` and `s_noise` are unused.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    ds: list[Tensor] = []  # derivatives, newest last
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        ds = [*ds[-(LMS_ORDER - 1):], to_d(x, sig[i], denoised)]
        coeffs = lms_coefficients(sig, i, len(ds))  # coeffs[j] weighs the derivative at sigmas[i - j]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """Integrals over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomials on the nodes
    sigma_i, sigma_{i-1}, ..., sigma_{i-order+1}: element j belongs to the node sigma_{i-j}.

    Exact (closed form): each basis polynomial is expanded in u = tau - sigma_i and integrated from 0
    to h = sigma_{i+1} - sigma_i, which keeps the cancellation small.
    """
    nodes = [sigmas[i - k] - sigmas[i] for k in range(order)]  # shifted so the interval starts at 0
    h = sigmas[i + 1] - sigmas[i]
    coeffs = []
    for j, node_j in enumerate(nodes):
        poly = [1.0]  # coefficients of u^0, u^1, ...
        for k, node_k in enumerate(nodes):
            if k == j:
                continue
            scale = 1.0 / (node_j - node_k)
            # poly *= (u - node_k) * scale
            poly = [scale * (lo - node_k * hi) for lo, hi in zip([0.0, *poly], [*poly, 0.0])]
        coeffs.append(sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly)))
    return coeffs


def sample_dpm_2(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 in sigma space (Lu et al. 2022, Algorithm 1 with r = 1/2; k-diffusion `sample_dpm_2`):
    the derivative at the log-sigma midpoint, reached by an Euler half-step, drives the whole step.

    A step to sigma = 0 is plain Euler. A1111 runs it on a schedule with the next-to-last sigma dropped;
    that is the caller's choice (diffusers' KDPM2DiscreteScheduler keeps it). Deterministic: `generator`,
    `eta` and `s_noise` are unused.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        x = _dpm_2_step(model, x, sig[i], sig[i + 1], to_d(x, sig[i], denoised), sigmas)
    return x


def sample_dpm_2_ancestral(
    model: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Noise | None = None,
    callback: Callback | None = None,
    eta: float | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2 ancestral: a DPM-Solver-2 step to sigma_down, then noise of std sigma_up (k-diffusion
    `sample_dpm_2_ancestral`). eta defaults to 1; a step to sigma_down = 0 is Euler and adds no noise."""
    eta = check_eta(eta, default=1.0)
    sig = sigmas.tolist()
    n = len(sig) - 1
    for i in range(n):
        x = step_input(model, i, x)
        denoised = model(x, sigmas[i])
        report(callback, i, n, sigmas[i], x, denoised)
        sigma_down, sigma_up = (float(s) for s in ancestral_step(sigmas[i], sigmas[i + 1], eta))
        x = _dpm_2_step(model, x, sig[i], sigma_down, to_d(x, sig[i], denoised), sigmas)
        if sigma_down > 0:
            x = x + randn_like(x, generator) * (s_noise * sigma_up)
    return x


def _dpm_2_step(model: DenoiseFn, x: Tensor, sigma: float, sigma_to: float, d: Tensor, like: Tensor) -> Tensor:
    """One DPM2 step from sigma to sigma_to, given the derivative d at (x, sigma)."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_to)))  # geometric mean
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid, model(x_mid, like.new_tensor(sigma_mid)))
    return x + d_mid * (sigma_to - sigma)
