"""A1111's Tiling: with every convolution padding circularly, the UNet and the VAE treat the picture as a torus, so
shifting the input around shifts the output the same way (exactly, for shifts of whole deepest-level pixels)."""

import numpy as np
import pytest
import torch
from torch import nn

import sdtorch
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext
from sdtorch.tiling import wrapped_edges


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load()


def test_wrapped_unet_and_vae_commute_with_shifts(pipe):
    unet, vae = pipe.unet, pipe.vae
    step = 2 ** (len(pipe.config.unet.block_channels) - 1)  # one pixel of the deepest level, in latent pixels
    f = pipe.vae_scale_factor
    torch.manual_seed(0)
    x = torch.randn(1, pipe.config.vae.latent_channels, 8 * step, 8 * step)
    t, context = torch.tensor([500]), torch.randn(1, 77, pipe.config.text_encoder.width)
    shift = (3 * step, 5 * step)

    def roll(tensor, scale=1):
        return torch.roll(tensor, (shift[0] * scale, shift[1] * scale), dims=(2, 3))

    with torch.no_grad():
        plain_error = (unet(roll(x), t, context) - roll(unet(x, t, context))).abs().max()
        with wrapped_edges(unet, vae):
            wrapped_error = (unet(roll(x), t, context) - roll(unet(x, t, context))).abs().max()
            decoded_error = (vae.decode(roll(x)) - roll(vae.decode(x), f)).abs().max()
    assert wrapped_error < 1e-4 and decoded_error < 1e-4
    assert plain_error > 100 * wrapped_error  # zero padding sees the edges: no such symmetry
    assert all(m.padding_mode == "zeros" for m in unet.modules() if isinstance(m, nn.Conv2d))  # restored


def test_tiling_generation(pipe):
    kw = dict(prompt="a red circle", steps=4, seed=2)
    tiled = pipe(tiling=True, **kw)[0]
    assert "Tiling: True" in tiled.info["parameters"]
    assert parse_infotext(tiled.info["parameters"]).request.tiling is True
    assert not np.array_equal(np.asarray(tiled), np.asarray(pipe(**kw)[0]))
    assert "Tiling" not in pipe(**kw)[0].info["parameters"]
    with pytest.raises(InvalidInputError, match="tiled_decode"):
        pipe(tiling=True, tiled_decode=True, **kw)
