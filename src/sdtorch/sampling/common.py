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


class SeededNoise:
    """A1111's noise for seeded images (its `ImageRNG`): one CPU generator per image of the batch, seeded with that
    image's seed. The first draw is each image's initial noise and every later draw (a sampler's noise) continues
    the image's own stream, so image i of a batch is the image its seed gives alone, and a sampler's noise never
    repeats the initial noise."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, ...) noise on the CPU, row b from image b's stream (B = the number of seeds)."""
        if shape[0] != len(self.generators):
            raise InvalidInputError(f"noise for {shape[0]} images drawn from the streams of {len(self.generators)}")
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in self.generators])


Noise = torch.Generator | SeededNoise  # where random draws come from: one generator (diffusers) or per-image streams


def randn_like(x: Tensor, generator: Noise | None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (CPU generators: same on any device)."""
    if isinstance(generator, SeededNoise):
        return generator.randn(tuple(x.shape), x.dtype).to(x.device)
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
