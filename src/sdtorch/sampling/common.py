"""What every sampler shares: the model protocol, the per-step callback record, noise, ancestral steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..errors import InvalidInputError


class DenoiseFn(Protocol):
    """D(x, sigma) -> x0 for x = x0 + sigma * eps; `timestep(sigma)` is the UNet timestep (LCM needs it).

    A model may also define `step_input(i, x) -> x`, applied to x at the start of every step i (see below).
    """

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...

    def timestep(self, sigma: Tensor) -> Tensor: ...


@dataclass
class Step:
    """Passed to the callback after each sampler step (index counts from 0)."""

    index: int
    total: int
    sigma: float
    x: Tensor
    denoised: Tensor


Callback = Callable[[Step], None]


def report(callback: Callback | None, index: int, total: int, sigma: Tensor, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(Step(index, total, float(sigma), x, denoised))


def step_input(model: DenoiseFn, i: int, x: Tensor) -> Tensor:
    """x as step i starts from: the model's `step_input` hook may replace it (inpainting with an ordinary
    model puts the area outside the mask back on the noised original, as diffusers does after each step)."""
    hook = getattr(model, "step_input", None)
    return x if hook is None else hook(i, x)


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (CPU generators: same on any device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add sigma_up noise to reach sigma_to."""
    if eta == 0 or sigma_to == 0:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 4 with s(t) = 1)."""
    return (x - denoised) / sigma


def check_eta(eta: float | None, default: float) -> float:
    """The sampler's eta: `default` when None; negative values are refused."""
    if eta is None:
        return default
    if eta < 0:
        raise InvalidInputError(f"eta must be >= 0, not {eta}")
    return float(eta)
