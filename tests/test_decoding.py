"""Decoding latents to images: tiled decode, the float16 NaN fallback, the cheap preview, PIL conversion."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from torch import nn
from torch.profiler import ProfilerActivity, profile

from sdtorch import decoding
from sdtorch.configs import TINY_SD1, VAEConfig
from sdtorch.decoding import decode_latents, decode_tiled, latent_preview
from sdtorch.images import image_to_tensor, tensor_to_images
from sdtorch.errors import InvalidInputError, NonFiniteError
from sdtorch.models.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")

SCALE = 2  # TINY_SD1's VAE has two levels: one image pixel pair per latent pixel


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(TINY_SD1.vae).eval()


def record_decodes(monkeypatch, vae) -> list[tuple[int, ...]]:
    """Wrap `vae.decode` so that every latent shape it is given is recorded."""
    shapes, decode = [], vae.decode

    def recording(z):
        shapes.append(tuple(z.shape))
        return decode(z)

    monkeypatch.setattr(vae, "decode", recording)
    return shapes


def coverage(length: int, tile: int, overlap: int, scale: int) -> torch.Tensor:
    """How many tiles cover each image pixel along one axis."""
    count = torch.zeros(length * scale)
    for start, size, _ in decoding._axis_tiles(length, tile, overlap, scale):
        count[start * scale : (start + size) * scale] += 1
    return count


def tiling_errors(vae, latents, tile, overlap) -> tuple[float, float]:
    """Max abs difference between tiled and untiled decodes where one tile covers the pixel and in the seams."""
    with torch.no_grad():
        reference = vae.decode(latents)
        tiled = decode_tiled(vae, latents, tile, overlap)
    h, w = latents.shape[-2:]
    single = (coverage(h, tile, overlap, SCALE)[:, None] == 1) & (coverage(w, tile, overlap, SCALE)[None, :] == 1)
    err = (tiled - reference).abs().amax(dim=(0, 1))  # (H, W)
    return err[single].max().item(), err[~single].max().item()


class PointwiseVAE(nn.Module):
    """A decoder with no spatial context (1x1 conv, nearest 8x upsampling): tiling it must be exact."""

    def __init__(self):
        super().__init__()
        self.config = VAEConfig()  # four levels: 8 image pixels per latent pixel
        self.proj = nn.Conv2d(4, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.proj(z), scale_factor=8, mode="nearest")


class ChannelNorm(nn.Module):
    """Normalises each pixel over its channels: a GroupNorm stand-in with no statistics across pixels."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
        return x * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]


def local_decoder(vae: AutoencoderKL) -> AutoencoderKL:
    """The same convolutions without anything global (GroupNorm statistics, mid-block attention), so that
    the tiling error left is the receptive field's: convs near a tile border see zero padding."""
    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, ChannelNorm(child))
            else:
                swap(child)

    swap(vae.decoder)
    vae.decoder.mid_block.attentions[0] = nn.Identity()
    return vae


# ---------------------------------------------------------------- tile layout and blend weights


@pytest.mark.parametrize("length,tile,overlap", [
    (64, 64, 16), (65, 64, 16), (200, 64, 16), (114, 64, 16), (70, 64, 60), (113, 40, 12), (50, 8, 0),
])
def test_tiles_cover_the_axis_with_enough_overlap(length, tile, overlap):
    tiles = decoding._axis_tiles(length, tile, overlap, 8)
    starts = [start for start, _, _ in tiles]
    size = tiles[0][1]
    assert size == min(tile, length) and starts[0] == 0 and starts[-1] + size == length
    assert all(a + size - b >= overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough
    assert len(starts) == 1 or (len(starts) - 2) * (tile - overlap) + tile < length  # one tile fewer is too few
    assert torch.allclose(coverage_weights(tiles, length, 8), torch.ones(length * 8), atol=1e-6)
    for i, (start, _, w) in enumerate(tiles):  # weights vanish at every inner border, never at the image edge
        assert w[0].item() == pytest.approx(0.0 if i > 0 else 1.0, abs=1e-6)
        assert w[-1].item() == pytest.approx(0.0 if i < len(tiles) - 1 else 1.0, abs=1e-6)


def coverage_weights(tiles, length, scale):
    total = torch.zeros(length * scale)
    for start, size, w in tiles:
        total[start * scale : (start + size) * scale] += w
    return total


@pytest.mark.parametrize("shape,tile,overlap", [
    ((2, 4, 20, 33), 8, 2), ((1, 4, 37, 23), 16, 5), ((1, 4, 9, 40), 12, 0), ((1, 4, 70, 65), 64, 16),
    ((1, 4, 12, 70), 64, 60),  # three tiles overlap (and all three weigh) at some columns
])
def test_tiling_a_pointwise_decoder_is_exact(monkeypatch, shape, tile, overlap):
    vae = PointwiseVAE()
    latents = torch.randn(shape)
    before = latents.clone()
    with torch.no_grad():
        reference = vae.decode(latents)
        shapes = record_decodes(monkeypatch, vae)
        tiled = decode_tiled(vae, latents, tile, overlap)
    assert tiled.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
    assert (tiled - reference).abs().max().item() < 1e-5  # the blend weights sum to one everywhere
    assert len(shapes) > 1 and all(h <= tile and w <= tile for *_, h, w in shapes)
    assert torch.equal(latents, before)


def test_latent_that_fits_one_tile_is_decoded_directly(monkeypatch):
    vae = tiny_vae()
    latents = torch.randn(1, 4, 24, 17)
    with torch.no_grad():
        reference = vae.decode(latents)
        shapes = record_decodes(monkeypatch, vae)
        tiled = decode_tiled(vae, latents, tile=24, overlap=8)
    assert shapes == [(1, 4, 24, 17)] and torch.equal(tiled, reference)


def test_bad_tile_arguments():
    with pytest.raises(InvalidInputError):
        decode_tiled(tiny_vae(), torch.randn(1, 4, 8, 8), tile=8, overlap=8)
    with pytest.raises(InvalidInputError):
        decode_tiled(tiny_vae(), torch.randn(1, 4, 8, 8), tile=0)


# ---------------------------------------------------------------- tiled vs untiled, real decoders


def test_receptive_field_needs_the_overlap():
    """TINY_SD1's decoder sees 12 latent pixels around each one. Without its global parts, a 16-pixel overlap
    makes the tiled decode exact away from the seams (weights vanish where a tile's border padding reaches)
    and close in them; a 4-pixel overlap leaves border damage everywhere near a seam."""
    vae = local_decoder(tiny_vae())
    latents = torch.randn(1, 4, 60, 70)
    away, seams = tiling_errors(vae, latents, tile=32, overlap=16)
    assert away < 1e-5 and seams < 0.01  # measured 0.0000 / 0.0044
    away, seams = tiling_errors(vae, latents, tile=32, overlap=8)
    assert away < 1e-5 and seams < 0.04  # 0.0000 / 0.024
    away, seams = tiling_errors(vae, latents, tile=32, overlap=4)
    assert away > 0.05 and seams > 0.2  # 0.17 / 0.51: the overlap is inside the receptive field


def test_tiled_decode_close_to_untiled():
    """The unmodified tiny VAE with the default 64/16 tiles. What is left is each tile's own GroupNorm
    statistics and attention (the whole latent's in the untiled decode): a small, smooth difference, no
    larger in the seams than elsewhere. (TINY_SD1 has 1-2 channels per GroupNorm group, the worst case.)"""
    vae = tiny_vae()
    latents = torch.randn(1, 4, 72, 80)
    away, seams = tiling_errors(vae, latents, tile=64, overlap=16)
    assert away < 0.1 and seams < 0.1  # measured 0.059-0.067 both, on outputs up to |2|
    assert seams < 1.5 * away


def test_tiled_decode_memory_is_bounded(monkeypatch):
    """Peak CPU memory of a tiled decode is one tile's decode plus the output, well under the untiled decode's."""
    vae = tiny_vae()
    latents = torch.randn(1, 4, 64, 64)

    def peak_mib(fn) -> float:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        live = peak = 0
        for _, nbytes in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
            live += nbytes
            peak = max(peak, live)
        return peak / 2**20

    with torch.no_grad():
        one_tile = peak_mib(lambda: vae.decode(latents[:, :, :32, :32]))
        untiled = peak_mib(lambda: vae.decode(latents))
        shapes = record_decodes(monkeypatch, vae)
        tiled = peak_mib(lambda: decode_tiled(vae, latents, tile=32, overlap=8))
    output = 3 * (64 * SCALE) ** 2 * 4 / 2**20
    assert all(shape == (1, 4, 32, 32) for shape in shapes) and len(shapes) == 9
    assert tiled <= one_tile + 1.5 * output  # measured 3.27 MiB = 3.02 (one tile) + 0.19 (output) + weights
    assert tiled < untiled / 3  # 3.27 vs 12.06 MiB


# ---------------------------------------------------------------- decode_latents: dtype, tiling, NaN fallback


def test_decode_latents_untiled_matches_decode():
    vae = tiny_vae()
    latents = torch.randn(2, 4, 16, 12)
    before = latents.clone()
    with torch.no_grad():
        reference = vae.decode(latents)
    images, warnings = decode_latents(vae, latents)
    assert warnings == [] and torch.equal(images, reference) and torch.equal(latents, before)


def test_decode_latents_tiles_above_1024px(monkeypatch):
    vae = tiny_vae()
    shapes = []

    def fake_decode(z):  # shapes only: a 128x128 latent costs seconds through the real decoder
        shapes.append(tuple(z.shape))
        return torch.zeros(z.shape[0], 3, SCALE * z.shape[2], SCALE * z.shape[3])

    monkeypatch.setattr(vae, "decode", fake_decode)
    images, _ = decode_latents(vae, torch.zeros(1, 4, 128, 128))
    assert shapes == [(1, 4, 128, 128)] and images.shape == (1, 3, 256, 256)
    shapes.clear()
    images, _ = decode_latents(vae, torch.zeros(1, 4, 128, 136))
    assert len(shapes) == 9 and all(h <= 64 and w <= 64 for *_, h, w in shapes)
    assert images.shape == (1, 3, 256, 272)
    shapes.clear()
    decode_latents(vae, torch.zeros(1, 4, 40, 40), tiled=True, tile=32, overlap=8)
    assert len(shapes) == 4


def overflowing_fp16_vae() -> AutoencoderKL:
    """Finite in float32, but the decoder's first activations exceed float16's 65504 and turn into inf/NaN."""
    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    return vae.half()


@pytest.mark.parametrize("tiled", [False, True])
def test_float16_nan_falls_back_to_float32(tiled):
    vae = overflowing_fp16_vae()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    latents = torch.randn(1, 4, 20, 24)
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(latents.half())).all()  # the premise: float16 overflows
        vae32 = copy.deepcopy(vae).float()
        reference = decode_tiled(vae32, latents, 16, 4) if tiled else vae32.decode(latents)
    images, warnings = decode_latents(vae, latents, tiled=tiled, tile=16, overlap=4)
    assert warnings == ["VAE produced NaNs in float16; decoded in float32 instead (A1111's --no-half-vae)"]
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert torch.equal(images, reference)
    assert all(p.dtype == torch.float16 for p in vae.parameters())  # the caller's VAE is untouched
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())


def test_float16_without_overflow_stays_float16():
    vae = tiny_vae().half()
    images, warnings = decode_latents(vae, torch.randn(1, 4, 8, 8))
    assert warnings == [] and images.dtype == torch.float16 and torch.isfinite(images).all()


def test_broken_weights_raise_instead_of_a_black_image():
    vae = tiny_vae()
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="float32"):
        decode_latents(vae, torch.randn(1, 4, 8, 8))
    with pytest.raises(NonFiniteError, match="again in float32"):
        decode_latents(vae.half(), torch.randn(1, 4, 8, 8))
    assert next(vae.parameters()).dtype == torch.float16


def test_nonfinite_latents_raise():
    latents = torch.randn(1, 4, 8, 8)
    latents[0, 1, 2, 3] = float("inf")
    with pytest.raises(NonFiniteError, match="latents"):
        decode_latents(tiny_vae(), latents)


# ---------------------------------------------------------------- preview


def test_latent_preview_is_a1111_cheap_approximation():
    latents = torch.zeros(2, 4, 3, 5)
    latents[0, 0, 0, 0] = 1.0  # latent channel 0 alone: (0.298, 0.207, 0.208)
    latents[0, 3, 1, 2] = -2.0  # channel 3 at -2: (0.368, 0.542, 0.946)
    latents[1, :, 2, 4] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # (0.827, 0.575, 0.590)
    latents[1, 2, 0, 1] = 10.0  # (-1.58, 1.89, 2.64): clamped
    previews = latent_preview(latents)
    assert [p.size for p in previews] == [(5, 3), (5, 3)] and all(p.mode == "RGB" for p in previews)
    first, second = (np.asarray(p) for p in previews)
    # (rgb / 2 + 0.5) * 255, rounded, worked out by hand
    assert first[0, 0].tolist() == [165, 154, 154]
    assert first[1, 2].tolist() == [174, 197, 248]
    assert second[2, 4].tolist() == [233, 201, 203]
    assert second[0, 1].tolist() == [0, 255, 255]
    assert first[2, 2].tolist() == [128, 128, 128]  # a zero latent is mid grey
    with pytest.raises(InvalidInputError):
        latent_preview(torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------- PIL conversion


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_to_images_matches_diffusers_postprocess(dtype):
    images = torch.randn(2, 3, 16, 24) * 0.8
    images[0, :, 0, :] = (2 * (torch.arange(24) + 0.5) / 255 - 1)[None]  # exactly half-way between two levels
    images = images.to(dtype)
    ours = tensor_to_images(images)
    theirs = VaeImageProcessor(vae_scale_factor=8).postprocess(images, output_type="pil")
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))


def test_image_to_tensor_matches_diffusers_preprocess_and_round_trips():
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    ours = image_to_tensor(image).to(torch.float32)
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(image)
    assert ours.shape == (1, 3, 16, 24) and torch.equal(ours, theirs)
    assert np.array_equal(np.asarray(tensor_to_images(ours)[0]), pixels)
    assert np.array_equal(np.asarray(tensor_to_images(image_to_tensor(image).to(torch.float16))[0]), pixels)
    rgba = PIL.Image.fromarray(np.dstack([pixels, np.full((16, 24), 7, np.uint8)]))
    assert torch.equal(image_to_tensor(rgba.convert("RGBA")).to(torch.float32), ours)  # alpha dropped
    assert image_to_tensor(image).to(torch.bfloat16).dtype == torch.bfloat16
