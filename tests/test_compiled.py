"""Pipeline.compile(): the compiled UNet and VAE decoder give the plain path's images, and never a stale graph."""

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import psnr, random_pipeline

from sdtorch.decoding import decode_latents

from sdtorch.configs import TINY_SD1

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compiled_unet_gives_the_plain_images_and_follows_weight_changes_and_hooks():
    pipe = random_pipeline(TINY_SD1, seed=3)
    settings = dict(width=32, height=32, steps=4, cfg_scale=7.0, seed=5)
    plain = pipe("a red circle", **settings)[0]
    assert pipe.compile() is pipe
    compiled = pipe.compiled_unet
    assert not compiled.usable()  # gradients are on out here: the plain module runs
    assert psnr(pipe("a red circle", **settings)[0], plain) >= 50
    graph = compiled._compiled
    assert graph is not None  # the generation ran the graph, not the plain module
    assert pipe.compiled_decoder._compiled is not None  # and decoded by the compiled decoder

    g = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 7, 128, generator=g)
    with torch.inference_mode():
        first = compiled(x, t, context)
        torch.testing.assert_close(first, pipe.unet(x, t, context), rtol=1e-4, atol=1e-5)
        pipe.unet.conv_out.bias.add_(0.5)
        with inductor_config.patch(freezing=True):  # the weights are constants of the graph: it does not see this
            torch.testing.assert_close(graph(x, t, context)[0], first)
        changed = compiled(x, t, context)
        assert compiled._compiled is not graph
        torch.testing.assert_close(changed, first + 0.5, rtol=1e-4, atol=1e-4)
        handle = pipe.unet.conv_out.register_forward_hook(lambda module, args, out: out * 2)  # as a LoRA does
        assert not compiled.usable()
        torch.testing.assert_close(compiled(x, t, context), 2 * changed, rtol=1e-4, atol=1e-4)
        handle.remove()
    assert pipe.compile(False).compiled_unet is None


def test_compiled_step_caching_gives_the_plain_step_caching_images():
    pipe = random_pipeline(TINY_SD1, seed=3)
    settings = dict(width=32, height=32, steps=5, cfg_scale=7.0, seed=5, deep_cache=2)
    plain = pipe("a red circle", **settings)[0]
    assert psnr(pipe.compile()("a red circle", **settings)[0], plain) >= 50


def test_the_compiled_decoder_equals_the_vae_follows_weight_changes_and_leaves_training_and_tiles_plain():
    pipe = random_pipeline(TINY_SD1, seed=3).compile()
    decoder = pipe.compiled_decoder
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        first = decoder(z)
        torch.testing.assert_close(first, pipe.vae.decode(z), rtol=1e-4, atol=1e-5)
        graph = decoder._compiled
        pipe.vae.decoder.conv_out.bias.add_(0.25)  # frozen into the graph: it must be built again
        torch.testing.assert_close(decoder(z), first + 0.25, rtol=1e-4, atol=1e-4)
        assert decoder._compiled is not graph
        images, _ = decode_latents(pipe.vae, z, tiled=True, tile=4, overlap=2, decoder=decoder)
        torch.testing.assert_close(images, decode_latents(pipe.vae, z, tiled=True, tile=4, overlap=2)[0])
    with torch.enable_grad():
        assert decoder(z).requires_grad  # the plain module: the graph is for inference only
