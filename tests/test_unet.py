"""UNet parity against diffusers' UNet2DConditionModel with identical (random) weights."""

import dataclasses

import pytest
import torch
from conftest import assert_parity
from diffusers import UNet2DConditionModel

from sdtorch.configs import SD1, SD2, TINY_SD1, TINY_SD2, UNetConfig
from sdtorch.errors import InvalidInputError
from sdtorch.models.unet import UNet

THREE_LEVELS = UNetConfig(
    block_channels=(32, 64, 64),
    attention_levels=(True, False, True),
    layers_per_block=2,
    num_heads=(4, 2, 2),
    context_dim=48,
    transformer_depth=2,
)


def reference(cfg: UNetConfig) -> UNet2DConditionModel:
    """A diffusers UNet with random weights, norm affines perturbed away from (1, 0)."""
    kwargs = cfg.to_diffusers()
    kwargs.pop("_class_name")
    ref = UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return ref


def ours_from(ref: UNet2DConditionModel, cfg: UNetConfig) -> UNet:
    model = UNet(cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def inputs(cfg: UNetConfig, batch: int = 2, height: int = 16, width: int = 16, tokens: int = 77):
    x = torch.randn(batch, cfg.in_channels, height, width)
    t = torch.tensor([999, 1, 500][:batch])
    context = torch.randn(batch, tokens, cfg.context_dim)
    return x, t, context


@torch.no_grad()
def check(cfg: UNetConfig, **shape) -> None:
    ref = reference(cfg)
    ours = ours_from(ref, cfg)
    x, t, context = inputs(cfg, **shape)
    copies = [x.clone(), t.clone(), context.clone()]
    out = ours(x, t, context)
    assert all(torch.equal(a, b) for a, b in zip((x, t, context), copies)), "inputs were modified"
    assert_parity(out, ref(x, t, context).sample)


@pytest.mark.parametrize(
    "cfg",
    [
        TINY_SD1.unet,
        TINY_SD2.unet,  # Linear proj_in/proj_out, 64-wide heads
        dataclasses.replace(TINY_SD1.unet, in_channels=9),  # inpainting
        THREE_LEVELS,  # 2 ResBlocks per level, depth-2 transformers, attention on levels 0 and 2 only
    ],
    ids=["sd1", "sd2", "inpaint", "three-levels"],
)
def test_parity(cfg):
    check(cfg)


@pytest.mark.parametrize("cfg", [TINY_SD1.unet, THREE_LEVELS], ids=["sd1", "three-levels"])
def test_non_square_latents(cfg):
    check(cfg, height=16, width=24)


@pytest.mark.parametrize("cfg, height, width", [(TINY_SD1.unet, 15, 16), (THREE_LEVELS, 13, 18), (THREE_LEVELS, 9, 7)])
def test_sizes_that_downsampling_rounds_up(cfg, height, width):
    """Latents whose sides are not multiples of the UNet's downsampling (SD 1.5 at 520 px: 65 latents) work as in
    diffusers, which upsamples each level to its skip's size."""
    check(cfg, height=height, width=width)


@torch.no_grad()
def test_per_sample_and_scalar_timesteps():
    cfg = TINY_SD1.unet
    ref = reference(cfg)
    ours = ours_from(ref, cfg)
    x, _, context = inputs(cfg, batch=3)
    for t in (torch.tensor([0.5, 421.25, 999.0]), torch.tensor([3, 3, 700])):
        assert_parity(ours(x, t, context), ref(x, t, context).sample)
    per_sample = ours(x, torch.tensor([10, 10, 900]), context)
    assert not torch.allclose(per_sample[2], ours(x, torch.tensor([10, 10, 10]), context)[2])
    for scalar in (10, torch.tensor(10), torch.tensor([10])):
        assert_parity(ours(x, scalar, context), ref(x, 10, context).sample)


@torch.no_grad()
def test_meta_construction_and_assign_load():
    cfg = TINY_SD2.unet
    ref = reference(cfg)
    with torch.device("meta"):
        ours = UNet(cfg)
    assert list(ours.buffers()) == []
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x, t, context = inputs(cfg)
    assert_parity(ours(x, t, context), ref(x, t, context).sample)


@pytest.mark.parametrize("cfg", [SD1.unet, SD2.unet], ids=["sd1", "sd2"])
def test_full_size_keys_and_shapes_match_diffusers(cfg):
    kwargs = cfg.to_diffusers()
    kwargs.pop("_class_name")
    with torch.device("meta"):
        ref = {k: v.shape for k, v in UNet2DConditionModel(**kwargs).state_dict().items()}
        ours = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    assert ours == ref


@torch.no_grad()
def test_bfloat16_weights_cast_the_time_embedding():
    cfg = TINY_SD1.unet
    model = ours_from(reference(cfg), cfg)
    x, t, context = inputs(cfg)
    full = model(x, t, context)
    half = model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()


@pytest.mark.parametrize("cfg, shape", [(TINY_SD1.unet, (1, 3, 16, 16)), (TINY_SD1.unet, (4, 16, 16))])
def test_bad_latent_shape_raises(cfg, shape):
    model = UNet(cfg)
    with pytest.raises(InvalidInputError):
        model(torch.randn(shape), torch.tensor([1]), torch.randn(1, 77, cfg.context_dim))


def test_bad_timesteps_or_context_raise():
    cfg = TINY_SD1.unet
    model = UNet(cfg)
    x = torch.randn(2, 4, 16, 16)
    with pytest.raises(InvalidInputError):
        model(x, torch.tensor([1, 2, 3]), torch.randn(2, 77, cfg.context_dim))
    with pytest.raises(InvalidInputError):
        model(x, torch.tensor([1, 2]), torch.randn(2, 77, cfg.context_dim + 1))
