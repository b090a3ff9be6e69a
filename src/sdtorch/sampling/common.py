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

    def __init__(self, seeds: list[int], seed_delta: int = 0):
        self.seeds, self.seed_delta = list(seeds), seed_delta  # seed_delta: A1111's ENSD (see `initial`)
        self.generators = [_seeded(seed) for seed in seeds]
        self.span: tuple[float, float] | None = None  # the sampling's smallest positive and largest sigma
        self._trees: list | None = None

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, ...) noise on the CPU, row b from image b's stream (B = the number of seeds)."""
        self._check_batch(shape[0])
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in self.generators])

    def initial(self, shape: tuple[int, ...], subseeds: list[int] | None = None, subseed_strength: float = 0.0,
                drawn_as: tuple[int, int] | None = None) -> Tensor:
        """Each image's initial noise (B, C, h, w) as A1111 draws it (`ImageRNG.first`): its stream's first draw;
        with a variation seed, turned by `subseed_strength` toward that seed's noise along the great circle
        (`slerp`); with `drawn_as` (h', w'), A1111's seed resize: drawn at that size from fresh generators of the
        seed and the variation seed, centred in (or cropped from the middle of) the seed's noise at the real size,
        the image's stream left unread, as A1111 leaves it. With a `seed_delta` (A1111's ENSD) the streams then
        start again from seed + delta."""
        self._check_batch(shape[0])
        drawn = shape[1:] if drawn_as is None else (shape[1], *drawn_as)
        images = []
        for i, (seed, generator) in enumerate(zip(self.seeds, self.generators)):
            noise = torch.randn(drawn, generator=generator if drawn_as is None else _seeded(seed))
            if subseeds is not None and subseed_strength != 0:
                noise = slerp(subseed_strength, noise, torch.randn(drawn, generator=_seeded(subseeds[i])))
            if drawn_as is not None:
                noise = _centred(noise, torch.randn(shape[1:], generator=_seeded(seed)))
            images.append(noise)
        if self.seed_delta:
            self.generators = [_seeded(seed + self.seed_delta) for seed in self.seeds]
        return torch.stack(images)

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


def slerp(t: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's spherical interpolation of two noise tensors (C, H, W), from `low` (t = 0) to `high` (t = 1): the
    angle between them is measured along dim 1 (per channel and column, as A1111 normalises); nearly parallel ones
    are mixed linearly, with A1111's weights (t on `low`)."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)  # (C, W)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    low_weight, high_weight = torch.sin((1 - t) * omega) / sin_omega, torch.sin(t * omega) / sin_omega  # (C, W)
    return low_weight.unsqueeze(1) * low + high_weight.unsqueeze(1) * high


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _centred(drawn: Tensor, canvas: Tensor) -> Tensor:
    """`drawn` (C, h', w') placed at the middle of `canvas` (C, h, w), or its middle cut out where it is larger, with
    A1111's offsets: floor((h - h') / 2), and a larger side's cut 2 * that offset shorter (one row or column of the
    canvas stays where the difference is odd)."""
    canvas = canvas.clone()
    (_, h, w), (_, h_drawn, w_drawn) = canvas.shape, drawn.shape
    dy, dx = (h - h_drawn) // 2, (w - w_drawn) // 2
    rows = h_drawn if dy >= 0 else h_drawn + 2 * dy
    cols = w_drawn if dx >= 0 else w_drawn + 2 * dx
    top, left, src_top, src_left = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    canvas[:, top:top + rows, left:left + cols] = drawn[:, src_top:src_top + rows, src_left:src_left + cols]
    return canvas


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
