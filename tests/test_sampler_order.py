"""Every ODE sampler converges to the exact probability-flow ODE solution at its theoretical order.

The data are a 3-D Gaussian mixture, whose denoiser is exact in closed form (sdtorch.evaluation.analytic),
so the only error left is the solver's. Each sampler runs on Karras sigmas from 14.6146 down to
sigma_min = 0.0292 (SD1's range) with n = 16, 32, 64, 128 steps, ending at sigma_min: a last step to
sigma = 0 is first order in every k-diffusion sampler (x = D(x)) and would hide the order behind a
fixed O(sigma_min^2) error. The order is the least-squares slope of log(error) against log(n).

Expected orders and why (measured values in the comments, this mixture, Karras, n = 16..128):
  1   Euler, DDIM (the same step in sigma space), Euler a at eta 0 (= Euler)             (1.00, 1.00, 1.00)
  2   Heun, DPM2, DPM2 a at eta 0, DPM++ 2M, 2M SDE / 2S a / SDE at eta 0               (1.96 .. 2.07)
  2   PLMS: the fixed Adams-Bashforth weights assume equal steps in sigma; on any graded grid
      (Karras, exponential, diffusers' uniform-timestep grids) the mismatch costs O(h^3) a step   (2.05)
  3   DPM++ 3M SDE at eta 0: third order with the corrected -2 phi_3 weight on the second
      difference (k-diffusion's -phi_3 measures 1.8 here). Its first step is first order, an O(h^2)
      term with a small constant that only wins beyond ~256 steps                                (3.05)
  3   UniPC bh2: UniP-2 predictor plus the UniC corrector raise order 2 to 3 (Zhao et al. 2023)   (3.06)
  >3  LMS: a 4-step polynomial (order 4), held back by its order 1, 2, 3 warm-up steps          (3.53)
Not here: DDPM, LCM and the ancestral/SDE samplers at eta > 0 are stochastic (no ODE to converge to).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from sdtorch.evaluation.analytic import GaussianMixture
from sdtorch.sampling.schedules import DiscreteSchedule, karras_sigmas

F64 = torch.float64
SCHEDULE = DiscreteSchedule()
SIGMA_MIN, SIGMA_MAX = SCHEDULE.sigma_min, SCHEDULE.sigma_max  # 0.0292, 14.6146
STEPS = (16, 32, 64, 128)
EXACT_TOL = 1e-9  # the reference is this close to the truth; the finest sampler errors are ~1e-6

# name: (module in sdtorch.sampling, function, (lowest, highest) accepted order)
ODE_SAMPLERS = {
    "Euler": ("k_samplers", "sample_euler", (0.7, 1.3)),
    "Euler a (eta 0)": ("k_samplers", "sample_euler_ancestral", (0.7, 1.3)),
    "Heun": ("k_samplers", "sample_heun", (1.7, 2.3)),
    "DPM2": ("k_samplers", "sample_dpm_2", (1.7, 2.3)),
    "DPM2 a (eta 0)": ("k_samplers", "sample_dpm_2_ancestral", (1.7, 2.3)),
    "LMS": ("k_samplers", "sample_lms", (3.2, 4.3)),
    "DPM++ 2M": ("dpmpp", "sample_dpmpp_2m", (1.7, 2.3)),
    "DPM++ 2M SDE (eta 0)": ("dpmpp", "sample_dpmpp_2m_sde", (1.7, 2.3)),
    "DPM++ 3M SDE (eta 0)": ("dpmpp", "sample_dpmpp_3m_sde", (2.7, 3.3)),
    "DPM++ 2S a (eta 0)": ("dpmpp", "sample_dpmpp_2s_ancestral", (1.7, 2.3)),
    "DPM++ SDE (eta 0)": ("dpmpp", "sample_dpmpp_sde", (1.7, 2.3)),
    "DDIM": ("timestep_samplers", "sample_ddim", (0.7, 1.3)),
    "PLMS": ("timestep_samplers", "sample_plms", (1.7, 2.3)),
    "UniPC": ("timestep_samplers", "sample_unipc", (2.7, 3.3)),
}


def mixture() -> GaussianMixture:
    means = torch.tensor([[0.8, 0.4, -0.4], [-0.8, 0.24, 0.64], [0.16, -0.96, 0.08]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.4, 0.6, 0.5]), torch.tensor([0.5, 0.3, 0.2]))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem() -> dict:
    """Start points x_T = x0 + sigma_max * eps (shaped like latents) and the exact ODE solutions."""
    gm = mixture()
    gen = torch.Generator().manual_seed(0)
    x0 = gm.sample(16, gen)  # (16, 3)
    x_T = (x0 + SIGMA_MAX * torch.randn(x0.shape, generator=gen, dtype=F64)).reshape(16, 3, 1, 1)
    ends = torch.tensor([SIGMA_MAX, SIGMA_MIN, 0.0], dtype=F64)
    return {
        "model": gm,
        "x_T": x_T,
        "at_sigma_min": gm.ode_solution(x_T, ends[:2], tol=EXACT_TOL),
        "at_zero": gm.ode_solution(x_T, ends[::2], tol=EXACT_TOL),
    }


def sampler(name: str):
    module, function, _ = ODE_SAMPLERS[name]
    return getattr(importlib.import_module(f"sdtorch.sampling.{module}"), function)


def run(name: str, problem: dict, sigmas: torch.Tensor) -> torch.Tensor:
    x_T = problem["x_T"]
    out = sampler(name)(problem["model"], x_T.clone(), sigmas, generator=torch.Generator().manual_seed(1), eta=0.0)
    assert out.shape == x_T.shape and out.dtype == F64
    return out


def fitted_order(steps: tuple[int, ...], errors: list[float]) -> float:
    """Minus the least-squares slope of log(error) against log(steps)."""
    log_n = torch.tensor(steps, dtype=F64).log()
    log_e = torch.tensor(errors, dtype=F64).log()
    centred = log_n - log_n.mean()
    return float(-(centred * (log_e - log_e.mean())).sum() / centred.square().sum())


@pytest.mark.parametrize("name", list(ODE_SAMPLERS))
def test_convergence_order(name: str, problem: dict):
    errors = []
    for n in STEPS:
        sigmas = karras_sigmas(n + 1, SIGMA_MIN, SIGMA_MAX)[:-1]  # (n + 1,): n steps ending at sigma_min
        errors.append((run(name, problem, sigmas) - problem["at_sigma_min"]).abs().max().item())
    order = fitted_order(STEPS, errors)
    low, high = ODE_SAMPLERS[name][2]
    shown = ", ".join(f"n={n}: {e:.2e}" for n, e in zip(STEPS, errors))
    assert low <= order <= high, f"{name}: measured order {order:.2f}, expected {low}..{high} ({shown})"
    assert errors[-1] > 30 * EXACT_TOL, "the reference is not accurate enough to measure this error"


@pytest.mark.parametrize("name", list(ODE_SAMPLERS))
def test_last_step_to_zero(name: str, problem: dict):
    """Run to sigma = 0, as users do: no worse than the run to sigma_min plus the final denoising's own
    O(sigma_min^2) error, |D(x(sigma_min), sigma_min) - x(0)| (both times 2 for slack)."""
    gm, n = problem["model"], 64
    sigmas = karras_sigmas(n, SIGMA_MIN, SIGMA_MAX)  # (n + 1,) ending ..., sigma_min, 0
    error_to_zero = (run(name, problem, sigmas) - problem["at_zero"]).abs().max().item()
    error_to_min = (run(name, problem, sigmas[:-1]) - problem["at_sigma_min"]).abs().max().item()
    final_denoise = (gm(problem["at_sigma_min"], SIGMA_MIN) - problem["at_zero"]).abs().max().item()
    assert math.isfinite(error_to_zero)
    assert error_to_zero <= 2 * (error_to_min + final_denoise), (
        f"{name}: error {error_to_zero:.2e} at sigma 0, {error_to_min:.2e} at sigma_min, "
        f"final denoising alone {final_denoise:.2e}"
    )


# --- the analytic model itself --------------------------------------------------------------------


def test_denoiser_is_tweedie():
    """D(x, sigma) = x + sigma^2 grad log p_sigma(x), with p_sigma built independently by torch.distributions."""
    gm = mixture()
    x = (torch.randn(6, 3, dtype=F64) * 2).requires_grad_(True)
    for sigma in (0.05, 0.7, 9.0):
        scale = (gm.stds**2 + sigma**2).sqrt()[:, None].expand(-1, 3)  # (K, 3)
        p_sigma = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=gm.weights),
            torch.distributions.Independent(torch.distributions.Normal(gm.means, scale), 1),
        )
        (score,) = torch.autograd.grad(p_sigma.log_prob(x).sum(), x)
        expected = x.detach() + sigma**2 * score
        torch.testing.assert_close(gm(x.detach(), sigma), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(gm.eps(x.detach(), sigma), -sigma * score, rtol=0, atol=1e-12)
    # per-sample sigmas and latent-shaped input (D = C * H * W)
    x4, sigmas = torch.randn(2, 3, 1, 1, dtype=F64), torch.tensor([0.3, 5.0], dtype=F64)
    both = gm(x4, sigmas)
    assert both.shape == x4.shape
    torch.testing.assert_close(both[1:], gm(x4[1:], 5.0), rtol=0, atol=0)


def test_ode_solution_matches_gaussian_closed_form():
    """One Gaussian N(mu, s^2 I): the flow is x(sigma) = mu + (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2)."""
    mu, s = torch.tensor([[0.5, -0.3, 0.2]], dtype=F64), 0.4
    gm = GaussianMixture(mu, torch.tensor([s], dtype=F64), torch.tensor([1.0]))
    x_T = torch.randn(4, 3, dtype=F64) * SIGMA_MAX
    for end in (SIGMA_MIN, 0.0):
        exact = mu + (x_T - mu) * math.sqrt(s**2 + end**2) / math.sqrt(s**2 + SIGMA_MAX**2)
        solved = gm.ode_solution(x_T, torch.tensor([SIGMA_MAX, end], dtype=F64))
        torch.testing.assert_close(solved, exact, rtol=0, atol=1e-10)


def test_samples_moments_and_timestep():
    gm = mixture()
    x0 = gm.sample(40000, torch.Generator().manual_seed(3))  # (40000, 3)
    # standard errors here are <= 0.005 (mean) and ~0.01 (covariance entries)
    torch.testing.assert_close(x0.mean(0), gm.mean, rtol=0, atol=0.025)
    torch.testing.assert_close(x0.T.cov(), gm.covariance, rtol=0, atol=0.05)
    sigmas = torch.tensor([SIGMA_MAX, 1.0, SIGMA_MIN], dtype=F64)
    torch.testing.assert_close(gm.timestep(sigmas), SCHEDULE.sigma_to_t(sigmas))
    torch.testing.assert_close(gm.timestep(sigmas)[[0, 2]], torch.tensor([999.0, 0.0], dtype=F64))
    assert gm.timestep(1.0).shape == () and gm.timestep(sigmas[1]) == gm.timestep(sigmas)[1]
