"""The denoiser D(x, sigma) -> x0 estimate: a UNet, its schedule and parameterisation, and CFG.

Samplers only ever see this callable (k-diffusion's interface): they know nothing of timesteps,
epsilon vs v, or guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InvalidInputError
from .schedules import DiscreteSchedule, SamplingSchedule

PARAMETERISATIONS = ("epsilon", "v_prediction", "sample")


class Denoiser:
    """Wraps `unet(x_in, t, context) -> output` into `D(x, sigma) -> x0` for x = x0 + sigma * eps.

    Input scaling: the UNet was trained on variance-preserving x_t = x / sqrt(1 + sigma^2).
    Parameterisations (Karras et al. 2022, table 1 with sigma_data = 1 for v):
        epsilon:      x0 = x - sigma * out
        v_prediction: x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * out
        sample:       x0 = out
    Classifier-free guidance runs cond and uncond in one batch, on the UNet output:
        out = uncond + scale * (cond - uncond), optionally rescaled (Lin et al. 2023, eq. 15-16).
    """

    def __init__(
        self,
        unet: Callable[[Tensor, Tensor, Tensor], Tensor],
        schedule: DiscreteSchedule,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in PARAMETERISATIONS:
            raise InvalidInputError(f"prediction_type must be one of {PARAMETERISATIONS}, not {prediction_type!r}")
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = prediction_type
        self._grid: SamplingSchedule | None = None

    def use_timesteps_of(self, sampling: SamplingSchedule | None) -> None:
        """At the sigmas of `sampling`, call the UNet at its exact timesteps (as diffusers does)."""
        self._grid = sampling

    def timestep(self, sigma: Tensor) -> Tensor:
        """The UNet timestep for each sigma: the schedule grid's own where it matches, else log-sigma interpolation."""
        t = self.schedule.sigma_to_t(sigma)
        if self._grid is not None:
            grid_sigmas = self._grid.sigmas[:-1].to(sigma.device, torch.float64)
            match = (sigma.to(torch.float64)[:, None] - grid_sigmas[None]).abs() <= 1e-9 * grid_sigmas[None]
            found = match.any(dim=1)
            if found.any():
                exact = self._grid.timesteps.to(sigma.device, torch.float64)[match.float().argmax(dim=1)]
                t = torch.where(found, exact.to(t.dtype), t)
        return t

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor | float,
        context: Tensor,
        uncond_context: Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_rescale: float = 0.0,
        extra_channels: Tensor | None = None,
    ) -> Tensor:
        """x0 estimate for x (B,C,H,W) at noise level sigma (scalar or (B,)).

        context (B,L,D) is the prompt's; with `uncond_context` and a scale != 1, guidance is applied.
        extra_channels (B,5,H,W), for inpainting UNets, are appended to the scaled input unchanged.
        """
        if guidance_scale < 0:
            raise InvalidInputError(f"guidance scale must be >= 0, not {guidance_scale}")
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        guided = uncond_context is not None and guidance_scale != 1.0
        if guided:
            x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
            context = torch.cat([uncond_context, context])
            extra_channels = None if extra_channels is None else torch.cat([extra_channels, extra_channels])
        else:
            x_in, sigma_in = x, sigma
        s_in = sigma_in.to(x.dtype)[:, None, None, None]  # (2B|B,1,1,1)
        unet_in = x_in / (1 + s_in**2).sqrt()
        if extra_channels is not None:
            unet_in = torch.cat([unet_in, extra_channels.to(unet_in.dtype)], dim=1)  # (.., 4+5, H, W)
        out = self.unet(unet_in, self.timestep(sigma_in), context)  # eps | v | x0, as trained
        if guided:  # guidance on the raw output, as diffusers applies it (x0 is affine in it)
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
            if guidance_rescale > 0:
                out = _rescale(out, out_cond, guidance_rescale)
        s = sigma.to(x.dtype)[:, None, None, None]  # (B,1,1,1)
        return self._to_x0(x, s, out)

    def _to_x0(self, x: Tensor, s: Tensor, out: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s**2) - s / (1 + s**2).sqrt() * out
        return out


def _rescale(guided: Tensor, cond: Tensor, factor: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): match the guided output's std to the cond output's."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided
