"""AutoencoderKL parity with diffusers' AutoencoderKL, identical random weights, float32."""

import dataclasses

import pytest
import torch
from conftest import assert_parity
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from sdtorch.configs import TINY_SD1, VAEConfig
from sdtorch.errors import InvalidInputError
from sdtorch.models.vae import AutoencoderKL

# Three levels (f = 4), two ResBlocks per encoder level, channel changes on every level, 16 norm groups.
THREE_LEVELS = VAEConfig(block_channels=(16, 32, 48), layers_per_block=2, norm_groups=16)
CONFIGS = {"tiny_sd1": TINY_SD1.vae, "three_levels": THREE_LEVELS}


def _reference(config: VAEConfig) -> DiffusersAutoencoderKL:
    """diffusers' model for `config`, every tensor perturbed so that norms and biases are not 1/0."""
    kwargs = config.to_diffusers()
    kwargs.pop("_class_name")
    ref = DiffusersAutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # GroupNorm scale
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.mul_(1.5)
    return ref


def _ours(ref: DiffusersAutoencoderKL, config: VAEConfig) -> AutoencoderKL:
    model = AutoencoderKL(config).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request):
    torch.manual_seed(1)
    config = CONFIGS[request.param]
    ref = _reference(config)
    return config, ref, _ours(ref, config)


def test_state_dict_keys_match_diffusers_in_order():
    for config in CONFIGS.values():
        ref_sd = _reference(config).state_dict()
        ours_sd = AutoencoderKL(config).state_dict()
        assert list(ours_sd) == list(ref_sd)
        assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (27, 33)])
@torch.no_grad()
def test_encode_matches_diffusers(pair, size):
    config, ref, ours = pair
    x = torch.rand(2, 3, *size) * 2 - 1
    x_before = x.clone()
    expected = ref.encode(x).latent_dist
    posterior = ours.encode(x)
    assert_parity(posterior.mean, expected.mean)
    assert_parity(posterior.logvar, expected.logvar)
    assert_parity(posterior.std, expected.std)
    assert torch.equal(posterior.mode(), posterior.mean)
    assert torch.equal(x, x_before)


@torch.no_grad()
def test_sample_matches_diffusers_with_same_generator(pair):
    config, ref, ours = pair
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    expected = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
    got = ours.encode(x).sample(torch.Generator().manual_seed(7))
    assert_parity(got, expected)
    other = ours.encode(x).sample(torch.Generator().manual_seed(8))
    assert (other - got).abs().max() > 1e-3  # the noise really comes from the generator


@pytest.mark.parametrize("latent_size", [(4, 4), (5, 7)])
@torch.no_grad()
def test_decode_matches_diffusers(pair, latent_size):
    config, ref, ours = pair
    z = torch.randn(2, config.latent_channels, *latent_size)
    z_before = z.clone()
    expected = ref.decode(z).sample
    got = ours.decode(z)
    f = 2 ** (len(config.block_channels) - 1)
    assert got.shape == (2, config.out_channels, latent_size[0] * f, latent_size[1] * f)
    assert_parity(got, expected)
    assert torch.equal(z, z_before)


@torch.no_grad()
def test_forward_reconstructs_through_the_mode(pair):
    config, ref, ours = pair
    x = torch.rand(1, 3, 24, 40) * 2 - 1
    assert_parity(ours(x), ref(x).sample)


def test_scaling_factor_is_metadata_only():
    config = dataclasses.replace(TINY_SD1.vae, scaling_factor=0.5)
    ref = _reference(config)
    ours = _ours(ref, config)
    assert ours.scaling_factor == 0.5
    with torch.no_grad():
        z = torch.randn(1, 4, 4, 4)
        assert_parity(ours.decode(z), ref.decode(z).sample)  # diffusers' decode does not scale either


def test_meta_construction_then_assign_load_gives_same_numbers():
    config = THREE_LEVELS
    ref = _reference(config)
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    model.eval()
    assert not any(p.is_meta for p in model.parameters())
    x = torch.rand(1, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist
        posterior = model.encode(x)
        assert_parity(posterior.mean, expected.mean)
        assert_parity(posterior.logvar, expected.logvar)
        z = torch.randn(1, 4, 5, 7)
        assert_parity(model.decode(z), ref.decode(z).sample)


def test_gradients_flow_through_sample():
    model = AutoencoderKL(TINY_SD1.vae)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    loss = model.decode(model.encode(x).sample(torch.Generator().manual_seed(0))).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_logvar_is_clamped():
    model = AutoencoderKL(TINY_SD1.vae)
    with torch.no_grad():
        model.quant_conv.bias[4:].fill_(1e4)  # log-variance channels far above 20
        model.quant_conv.bias[:4].fill_(0.0)
        logvar = model.encode(torch.zeros(1, 3, 16, 16)).logvar
    assert logvar.max().item() == 20.0


def test_bad_shapes_raise_sdtorch_errors():
    model = AutoencoderKL(TINY_SD1.vae)
    with pytest.raises(InvalidInputError):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(InvalidInputError):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(InvalidInputError):
        model.decode(torch.zeros(1, 3, 4, 4))
