"""A data distribution whose denoiser and probability-flow ODE are known exactly: a Gaussian mixture.

For data x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x = x0 + sigma * eps (sigma space), each component of x is
N(mu_k, (s_k^2 + sigma^2) I), so the ideal denoiser (the posterior mean, Tweedie) is in closed form:
    r_k(x)  = softmax_k( log w_k - D/2 log v_k - |x - mu_k|^2 / (2 v_k) ),   v_k = s_k^2 + sigma^2
    D(x, s) = sum_k r_k(x) (mu_k + s_k^2 / v_k (x - mu_k))
It plugs into every sampler as the `model` (a `DenoiseFn`), and `ode_solution` integrates the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4) to near machine
precision, so a sampler's error is measured against the exact answer rather than a finer run of itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import InvalidInputError, SdtorchError
from ..sampling.schedules import DiscreteSchedule

F64 = torch.float64


class GaussianMixture:
    """Mixture of K isotropic Gaussians in D dimensions: means (K, D), stds (K,), weights (K,) (normalised).

    Inputs x may be shaped (B, D) or (B, *S) with prod(S) = D; sigma may be a scalar or one per sample (B,).
    """

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor, schedule: DiscreteSchedule | None = None):
        self.means = torch.as_tensor(means, dtype=F64)  # (K, D)
        self.stds = torch.as_tensor(stds, dtype=F64).reshape(-1)  # (K,)
        weights = torch.as_tensor(weights, dtype=F64).reshape(-1)  # (K,)
        K = self.means.shape[0]
        if self.means.ndim != 2 or self.stds.shape != (K,) or weights.shape != (K,):
            raise InvalidInputError(
                f"means must be (K, D), stds and weights (K,): got {tuple(self.means.shape)}, "
                f"{tuple(self.stds.shape)}, {tuple(weights.shape)}"
            )
        if (self.stds <= 0).any() or (weights <= 0).any():
            raise InvalidInputError("component stds and weights must be positive")
        self.weights = weights / weights.sum()
        self.schedule = schedule or DiscreteSchedule()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self) -> Tensor:
        """E[x0], (D,)."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """Cov[x0], (D, D): within-component variance plus the spread of the means."""
        centred = self.means - self.mean  # (K, D)
        within = (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=F64)
        return within + centred.T @ (self.weights[:, None] * centred)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of x0, (n, D) float64."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        noise = torch.randn(n, self.dim, generator=generator, dtype=F64)
        return self.means[component] + self.stds[component, None] * noise

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """E[x0 | x] for x = x0 + sigma * eps, computed in float64, returned in x's shape and dtype."""
        flat, s = self._flatten(x, sigma)  # (B, D), (1|B, 1)
        post, var = self._posterior(flat, s)  # (B, K), (1|B, K)
        gain = self.stds**2 / var  # (1|B, K) how much of x - mu_k each component keeps
        x0 = (post * gain).sum(1, keepdim=True) * flat + (post * (1 - gain)) @ self.means  # (B, D)
        return x0.reshape(x.shape).to(x.dtype)

    def eps(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """E[eps | x] = (x - D(x, sigma)) / sigma = sigma * sum_k r_k (x - mu_k) / v_k: no 0/0 at sigma = 0."""
        flat, s = self._flatten(x, sigma)
        post, var = self._posterior(flat, s)
        weight = s * post / var  # (B, K)
        eps = weight.sum(1, keepdim=True) * flat - weight @ self.means  # (B, D)
        return eps.reshape(x.shape).to(x.dtype)

    def _flatten(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        flat = x.reshape(x.shape[0], -1).to(F64)  # (B, D)
        if flat.shape[1] != self.dim:
            raise InvalidInputError(f"x has {flat.shape[1]} values per sample; the mixture has dimension {self.dim}")
        return flat, torch.as_tensor(sigma, dtype=F64, device=flat.device).reshape(-1, 1)  # (1|B, 1)

    def _posterior(self, flat: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Component posterior r (B, K) and the noised component variances v = s_k^2 + sigma^2 (1|B, K)."""
        var = self.stds**2 + s**2  # (1|B, K)
        dist2 = (flat[:, None, :] - self.means).square().sum(-1)  # (B, K)
        logits = self.weights.log() - 0.5 * self.dim * var.log() - 0.5 * dist2 / var
        return logits.softmax(dim=1), var

    __call__ = denoise

    def timestep(self, sigma: Tensor) -> Tensor:
        """The training timestep of each sigma (log-sigma interpolation), for samplers that ask for it."""
        sigma = torch.as_tensor(sigma, dtype=F64)
        return self.schedule.sigma_to_t(sigma.reshape(-1)).reshape(sigma.shape)

    def ode_solution(
        self,
        x: Tensor,
        sigmas: Tensor,
        *,
        tol: float = 1e-9,
        steps_per_unit: int = 128,
        max_steps: int = 1 << 16,
    ) -> Tensor:
        """The exact probability-flow ODE solution from x at sigmas[0] to sigmas[-1], (B, ...) float64.

        dx/dsigma = (x - D) / sigma is 0/0 at sigma = 0, but it equals eps(x, sigma), which is smooth
        there (closed form above), so sigma = 0 needs no special end step. Classical RK4 runs in
        u = log(sigma + c), c = min(s_k) / 4: like log sigma at large sigma (where the dynamics are
        scale-free) and like sigma / c near 0, so steps go where x changes. The step count is doubled
        until doubling moves the result by less than `tol` (max abs); the returned value is then within
        about tol / 15 of the truth.
        """
        sigma_from, sigma_to = float(sigmas[0]), float(sigmas[-1])
        if not sigma_from >= sigma_to >= 0 or sigma_from <= 0:
            raise InvalidInputError(f"need sigmas[0] >= sigmas[-1] >= 0, got {sigma_from} and {sigma_to}")
        c = float(self.stds.min()) / 4
        u0, u1 = math.log(sigma_from + c), math.log(sigma_to + c)
        steps = max(16, math.ceil(steps_per_unit * (u0 - u1)))
        previous = self._rk4(x.to(F64), u0, u1, c, steps)
        while steps < max_steps:
            steps *= 2
            current = self._rk4(x.to(F64), u0, u1, c, steps)
            if (current - previous).abs().max().item() < tol:
                return current
            previous = current
        raise SdtorchError(f"the reference ODE solution did not converge to {tol} within {max_steps} RK4 steps")

    def _rk4(self, x: Tensor, u0: float, u1: float, c: float, steps: int) -> Tensor:
        def f(x: Tensor, u: float) -> Tensor:  # dx/du = (sigma + c) dx/dsigma, sigma = e^u - c
            return math.exp(u) * self.eps(x, max(math.exp(u) - c, 0.0))

        h = (u1 - u0) / steps
        for i in range(steps):
            u = u0 + i * h
            k1 = f(x, u)
            k2 = f(x + 0.5 * h * k1, u + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, u + 0.5 * h)
            k4 = f(x + h * k3, u + h)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return x
