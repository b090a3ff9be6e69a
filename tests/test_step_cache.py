"""Step caching (DeepCache): the UNet's split is exact, the cache runs the whole UNet on the calls it should,
and a request with it says so in its infotext."""

import pytest
import torch
from conftest import psnr, random_pipeline

import sdtorch
from sdtorch.configs import TINY_SD1, TINY_SD2
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext
from sdtorch.models.unet import UNet
from sdtorch.step_cache import StepCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1", "sd2"])
def test_split_forward_is_the_unet_and_its_shallow_part_on_the_same_features_is_too(config):
    torch.manual_seed(0)
    unet = UNet(config.unet).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 12, 12, generator=g), torch.tensor([10, 700])
    context = torch.randn(2, 7, config.unet.context_dim, generator=g)
    with torch.no_grad():
        whole = unet(x, t, context)
        for shallow in range(config.unet.layers_per_block + 1):
            out, deep = unet.split_forward(x, t, context, shallow=shallow)
            torch.testing.assert_close(out, whole, rtol=0, atol=0)
            again, kept = unet.split_forward(x, t, context, deep=deep, shallow=shallow)
            assert kept is deep
            torch.testing.assert_close(again, whole, rtol=1e-6, atol=1e-6)
            # the shallow part does depend on the input and the deep features
            assert not torch.allclose(unet.split_forward(x + 1, t, context, deep=deep, shallow=shallow)[0], whole)
            assert not torch.allclose(unet.split_forward(x, t, context, deep=deep + 1, shallow=shallow)[0], whole)
        with pytest.raises(InvalidInputError, match="shallow"):
            unet.split_forward(x, t, context, shallow=config.unet.layers_per_block + 1)


def test_the_cache_runs_the_whole_unet_every_interval_calls_and_when_shapes_change():
    calls = []

    def split_forward(x, t, context, deep):
        calls.append("whole" if deep is None else "shallow")
        return x + (0 if deep is None else deep), x * 0 + 1  # a deep feature of ones

    cache = StepCache(split_forward, interval=3)
    x, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 8)
    outs = [cache(x, torch.tensor([1, 1]), context) for _ in range(7)]
    assert calls == ["whole", "shallow", "shallow", "whole", "shallow", "shallow", "whole"]
    assert [o.max().item() for o in outs] == [0, 1, 1, 0, 1, 1, 0]  # the shallow calls got the kept features
    cache(torch.zeros(2, 4, 16, 16), torch.tensor([1, 1]), context)  # a new size (a hires pass): whole again
    cache(x[:1], torch.tensor([1]), context[:1])  # a new batch: whole again
    assert calls[7:] == ["whole", "whole"]
    with pytest.raises(ValueError):
        StepCache(split_forward, interval=0)


def test_interval_1_is_the_plain_path_and_a_cached_run_records_its_interval():
    pipe = random_pipeline(TINY_SD1, seed=3)
    settings = dict(width=32, height=32, steps=6, cfg_scale=7.0, seed=5)
    plain = pipe("a red circle", **settings)[0]
    assert psnr(pipe("a red circle", deep_cache=1, **settings)[0], plain) == float("inf")
    cached = pipe("a red circle", deep_cache=3, **settings)[0]
    assert psnr(cached, plain) < 60  # three of six steps ran only the shallow part: not the same picture
    text = cached.info["parameters"]
    assert "Deep cache interval: 3" in text and "Deep cache" not in plain.info["parameters"]
    assert parse_infotext(text).request.deep_cache == 3
    with pytest.raises(InvalidInputError, match="deep_cache"):
        pipe("a red circle", deep_cache=0, **settings)


def test_the_shapes_model_keeps_its_picture_with_step_caching():
    """The quality cost on the shipped model, by picture distance (the judge's figures are in the README)."""
    pipe = sdtorch.load()
    prompts = ["a red circle at the top left on a white background", "a small green triangle at the bottom right"]
    plain = pipe(prompts, seed=1)
    cached = pipe(prompts, seed=1, deep_cache=2)
    assert min(psnr(a, b) for a, b in zip(cached, plain)) >= 30
