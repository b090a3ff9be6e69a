"""What every sampler shares: the model protocol, the per-step callback record, noise, ancestral steps."""

from __future__ import annotations

import math
import warnings
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
        self.seeds = list(seeds)
        self.generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        self.span: tuple[float, float] | None = None  # the sampling's smallest positive and largest sigma
        self._trees: list | None = None

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, ...) noise on the CPU, row b from image b's stream (B = the number of seeds)."""
        self._check_batch(shape[0])
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in self.generators])

    def brownian(self, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
        """The SDE samplers' noise as A1111 draws it (k-diffusion's BrownianTreeNoiseSampler with one seed per
        image): (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) of a Brownian motion W per image, a
        torchsde Brownian tree over `span` seeded with the image's seed (so the noise does not depend on the
        steps: a seed keeps its look at another step count). x: (B, ...) -> noise like x."""
        import torchsde

        self._check_batch(x.shape[0])
        if self.span is None:
            raise InvalidInputError("Brownian noise needs the sampling's sigma span (sample() sets it)")
        low, high = sorted((_float32(sigma), _float32(sigma_next)))
        if self._trees is None:
            w0 = torch.zeros(x.shape[1:], dtype=torch.float32)
            self._trees = [torchsde.BrownianTree(_float32(self.span[0]), w0, _float32(self.span[1]), entropy=seed)
                           for seed in self.seeds]
        sign = 1.0 if sigma_next > sigma else -1.0
        with warnings.catch_warnings():  # torchsde rounds the span's ends, then clamps queries a rounding past them
            warnings.filterwarnings("ignore", "Should have", UserWarning)
            w = torch.stack([tree(low, high) for tree in self._trees]) * sign  # W(sigma_next) - W(sigma)
        return (w / math.sqrt(high - low)).to(x.device, x.dtype)

    def _check_batch(self, batch: int) -> None:
        if batch != len(self.generators):
            raise InvalidInputError(f"noise for {batch} images drawn from the streams of {len(self.generators)}")


def _float32(value: float) -> float:
    """A sigma as A1111's float32 sigma tensors hold it (the Brownian tree's query times)."""
    return float(torch.tensor(value, dtype=torch.float32))


Noise = torch.Generator | SeededNoise  # where random draws come from: one generator (diffusers) or per-image streams


def sde_noise(x: Tensor, generator: Noise | None, sigma: float, sigma_next: float) -> Tensor:
    """The normalised noise of an SDE step from sigma to sigma_next: A1111's Brownian-tree noise for seeded images,
    else one plain draw (what diffusers' SDE solvers draw from a generator)."""
    if isinstance(generator, SeededNoise):
        return generator.brownian(x, sigma, sigma_next)
    return randn_like(x, generator)


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
