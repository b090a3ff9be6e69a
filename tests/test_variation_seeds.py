"""A1111's variation seeds (subseed, subseed_strength) and seed resize, on the seeds' initial noise."""

import numpy as np
import pytest
import torch
from conftest import psnr

import sdtorch
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext
from sdtorch.sampling.common import SeededNoise

SHAPE = (2, 4, 6, 5)


def first_draw(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The angle between a and b along dim 1 (how A1111's slerp measures it), per channel and column."""
    return torch.acos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))


def test_variation_noise_turns_from_the_seed_to_the_subseed():
    seeds, subseeds = [3, 4], [7, 8]
    plain = SeededNoise(seeds).initial(SHAPE)
    assert torch.equal(plain[1], first_draw(4, SHAPE[1:]))
    assert torch.equal(SeededNoise(seeds).initial(SHAPE, subseeds, 0.0), plain)
    assert torch.allclose(SeededNoise(seeds).initial(SHAPE, subseeds, 1.0)[1], first_draw(8, SHAPE[1:]), atol=1e-6)
    half = SeededNoise(seeds).initial(SHAPE, subseeds, 0.5)[0]
    own, other = first_draw(3, SHAPE[1:]), first_draw(7, SHAPE[1:])
    # halfway: equal weights sin(w/2) / sin(w) = 1 / (2 cos(w/2)) on both, w their angle along dim 1
    weight = 1 / (2 * torch.cos(angle(own, other) / 2))  # (C, W)
    assert torch.allclose(half, weight.unsqueeze(1) * (own + other), atol=1e-5)


def test_seed_resize_draws_the_noise_at_the_other_size():
    noise = SeededNoise([3])
    out = noise.initial((1, 4, 6, 6), drawn_as=(2, 4))  # a 2x4 draw centred in the seed's own 6x6 noise
    canvas, drawn = first_draw(3, (4, 6, 6)), first_draw(3, (4, 2, 4))
    assert torch.equal(out[0, :, 2:4, 1:5], drawn)
    assert torch.equal(out[0, :, :2], canvas[:, :2]) and torch.equal(out[0, :, :, 5:], canvas[:, :, 5:])
    bigger = SeededNoise([3]).initial((1, 4, 6, 6), drawn_as=(9, 6))  # the middle of a 9x6 draw, A1111's offsets
    assert torch.equal(bigger[0, :, :5], first_draw(3, (4, 9, 6))[:, 2:7])
    assert torch.equal(bigger[0, :, 5:], canvas[:, 5:])  # an odd difference leaves a row of the canvas
    # A1111 draws the resized noise from fresh generators: the image's stream is still at its start
    assert torch.equal(noise.randn((1, 4, 6, 6))[0], canvas)


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load()


def test_generation_with_variation_seeds(pipe, tmp_path):
    kw = dict(prompt="a red circle", steps=6, sampler_name="Euler")
    full = pipe(seed=3, subseed=7, subseed_strength=1.0, batch_size=2, **kw)
    # all the way to the variation seed, a deterministic sampler draws the variation seed's own image
    assert psnr(full[1], pipe(seed=8, **kw)[0]) >= 50
    items = parse_infotext(full[1].info["parameters"])
    assert (items.request.seed, items.request.subseed, items.request.subseed_strength) == (4, 8, 1.0)
    part = pipe(seed=3, subseed=7, subseed_strength=0.3, **kw)[0]
    assert psnr(part, pipe(seed=3, **kw)[0]) < 50 and psnr(part, pipe(seed=7, **kw)[0]) < 50
    again = pipe(request=parse_infotext(part.info["parameters"]).request)[0]  # the PNG says how to draw it again
    assert np.array_equal(np.asarray(again), np.asarray(part))
    plain = pipe(seed=3, subseed=7, **kw)[0]  # strength 0: no variation, and none written
    assert "Variation seed" not in plain.info["parameters"]
    same_size = pipe(seed=3, seed_resize_from_w=64, seed_resize_from_h=64, **kw)[0]
    assert np.array_equal(np.asarray(same_size), np.asarray(plain))
    resized = pipe(seed=3, seed_resize_from_w=48, seed_resize_from_h=32, **kw)[0]
    assert "Seed resize from: 48x32" in resized.info["parameters"]
    assert parse_infotext(resized.info["parameters"]).request.seed_resize_from_w == 48
    with pytest.raises(InvalidInputError, match="explicit generator"):
        pipe(generator=torch.Generator().manual_seed(1), subseed_strength=0.5, **kw)
    with pytest.raises(InvalidInputError, match="subseed_strength"):
        pipe(seed=1, subseed_strength=1.5, **kw)


def test_ensd_restarts_the_sampler_noise_at_seed_plus_delta(pipe):
    """A1111's ENSD (eta_noise_seed_delta): after the initial noise, each image's sampler noise is drawn from
    seed + delta; so the initial noise stays the seed's, and a deterministic sampler does not change at all."""
    noise = SeededNoise([3, 4], seed_delta=31337)
    first = noise.initial((2, 4, 5, 5))
    assert torch.equal(first[1], first_draw(4, (4, 5, 5)))
    assert torch.equal(noise.randn((2, 4, 5, 5))[1], first_draw(4 + 31337, (4, 5, 5)))
    kw = dict(prompt="a blue square", steps=6, seed=5)
    ancestral = pipe(sampler_name="Euler a", eta_noise_seed_delta=31337, **kw)[0]
    assert psnr(ancestral, pipe(sampler_name="Euler a", **kw)[0]) < 50
    assert "ENSD: 31337" in ancestral.info["parameters"]
    assert np.array_equal(np.asarray(pipe(request=parse_infotext(ancestral.info["parameters"]).request)[0]),
                          np.asarray(ancestral))
    euler = [pipe(sampler_name="Euler", eta_noise_seed_delta=delta, **kw)[0] for delta in (0, 31337)]
    assert np.array_equal(np.asarray(euler[0]), np.asarray(euler[1]))
