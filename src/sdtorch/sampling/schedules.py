"""Noise schedules: the training schedule, timestep spacing, and the sigma schedules samplers walk.

Conventions (k-diffusion's, used by every sampler in sdtorch):
    x = x0 + sigma * eps            ("sigma space"; the UNet sees x / sqrt(1 + sigma^2))
    sigma_t = sqrt((1 - abar_t) / abar_t),   abar_t = alphas_cumprod[t]
A variance-preserving latent x_t (diffusers' DDIM/DDPM space) is x / sqrt(1 + sigma^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..configs import ScheduleConfig
from ..errors import InvalidInputError

SPACINGS = ("leading", "linspace", "trailing")
SCHEDULES = ("automatic", "karras", "exponential", "uniform")


class DiscreteSchedule:
    """The SD training schedule: betas, alphas_cumprod and sigmas for timesteps 0..T-1 (float64)."""

    def __init__(self, config: ScheduleConfig | None = None):
        config = config or ScheduleConfig()
        T = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
        elif config.beta_schedule == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
        else:
            raise InvalidInputError(f"unknown beta schedule {config.beta_schedule!r}: use scaled_linear or linear")
        self.config = config
        self.num_train_timesteps = T
        self.betas = betas  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # (T,) increasing
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma, by linear interpolation in log sigma (k-diffusion / diffusers)."""
        log_sigma = sigma.to(torch.float64).clamp(min=self.sigma_min).log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_train_timesteps - 1)
        low, high = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        w = ((log_sigma - low) / (high - low)).clamp(0, 1)
        return (idx - 1 + w).to(sigma.dtype if sigma.is_floating_point() else torch.float32)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at fractional timesteps, by linear interpolation in sigma (diffusers' `np.interp`)."""
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - low
        return (1 - w) * self.sigmas[low] + w * self.sigmas[high]

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 1) -> torch.Tensor:
        """`steps` timesteps, descending, spaced as diffusers' `timestep_spacing` (float64, may be fractional)."""
        T = self.num_train_timesteps
        if spacing == "linspace":
            return torch.linspace(0, T - 1, steps, dtype=torch.float64).flip(0)
        if spacing == "leading":
            ratio = T // steps
            return (torch.arange(steps, dtype=torch.float64) * ratio).round().flip(0) + steps_offset
        if spacing == "trailing":
            ratio = T / steps
            return (torch.arange(T, 0, -ratio, dtype=torch.float64)).round() - 1
        raise InvalidInputError(f"unknown timestep spacing {spacing!r}: use one of {', '.join(SPACINGS)}")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: (steps + 1,) sigmas from sigma_max down to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """(steps + 1,) sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@dataclass(frozen=True)
class SamplingSchedule:
    """What a sampler walks: sigmas (n + 1,) descending (float64) and the UNet timestep at each of the first n.

    The last sigma is 0 for most samplers; the timestep samplers that end at the smallest training
    noise level (DDIM, PLMS with `set_alpha_to_one=False`) end at sigma_min instead.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def grid_at(schedule: DiscreteSchedule, timesteps: torch.Tensor, final_sigma: float = 0.0) -> SamplingSchedule:
    """The sampling schedule that visits `timesteps` (n,) (sigma by diffusers' interpolation), ending at `final_sigma`."""
    final = torch.tensor([final_sigma], dtype=torch.float64)
    return SamplingSchedule(torch.cat([schedule.t_to_sigma(timesteps), final]), timesteps)


def check_steps(schedule: DiscreteSchedule, steps: int) -> None:
    """Refuse step counts outside 1..T (T = the training schedule's length)."""
    if not isinstance(steps, int) or not 1 <= steps <= schedule.num_train_timesteps:
        raise InvalidInputError(f"steps must be an integer in 1..{schedule.num_train_timesteps}, not {steps!r}")


def sampling_schedule(
    schedule: DiscreteSchedule,
    steps: int,
    kind: str = "automatic",
    spacing: str = "leading",
    steps_offset: int = 1,
) -> SamplingSchedule:
    """Sigmas for `steps` sampler steps.

    automatic: the model's own discrete timesteps at `spacing` (diffusers' default: sigma by linear
        interpolation at each timestep). uniform: same as automatic with linspace spacing.
    karras / exponential: over the model's whole sigma range (as A1111 and k-diffusion), timesteps by
        log-sigma interpolation.
    """
    check_steps(schedule, steps)
    if kind == "uniform":
        kind, spacing = "automatic", "linspace"
    if kind == "automatic":
        timesteps = schedule.timesteps(steps, spacing, steps_offset)
        return grid_at(schedule, timesteps)
    if kind == "karras":
        sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    elif kind == "exponential":
        sigmas = exponential_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    else:
        raise InvalidInputError(f"unknown schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
    return SamplingSchedule(sigmas, schedule.sigma_to_t(sigmas[:-1]))
