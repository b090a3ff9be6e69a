"""From latents to pictures: tiled VAE decoding, the float16 NaN fallback, a cheap preview, PIL conversion.

    decode_latents(vae, latents / scaling_factor) -> (images in [-1, 1], warnings)   the pipeline's entry
    decode_tiled(vae, latents)                    -> images, decoded tile by tile in bounded memory
    latent_preview(latents)                       -> PIL previews by a fixed 4 -> 3 linear map (no VAE)

Tiling is not exact, for two reasons. Each 3x3 conv near a tile border sees zero padding instead of the
neighbouring latent: SD's decoder sees 18 latent pixels around each one, and the damage fades below 1e-2
about 8 pixels in. So a tile's blend weight is zero on the outer quarter of each overlap and cross-fades
(smoothstep) over its middle half; with the default 16-pixel overlap the damaged pixels barely count. And
the GroupNorms and the mid-block attention see one tile's statistics, not the whole latent's: a smooth
difference everywhere (not at the seams) that shrinks as tiles grow, as in diffusers' tiled decode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import PIL.Image
import torch

from .errors import InvalidInputError, NonFiniteError
from .models.vae import AutoencoderKL

TILE_ABOVE = 128 * 128  # decode_latents tiles latents with more positions than this (a 1024x1024 image)
BLEND_MARGIN = 0.25  # fraction of an overlap, at each end, where the tile nearer its border gets no weight

# SD1 latent channel -> RGB in [-1, 1] (rows: latent channels; columns: R, G, B), fitted on scaled
# latents: AUTOMATIC1111's "Approx cheap" preview (sd_vae_approx.cheap_approximation), no bias.
LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of size min(tile, length) that cover [0, length) with neighbours
    overlapping by at least `overlap`; spread evenly, so the first starts at 0 and the last ends at length."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _ramp(distance: torch.Tensor, overlap: float) -> torch.Tensor:
    """Weight of a tile at `distance` from its border, across an overlap of width `overlap`: 0 on the outer
    margin, where the border's zero padding spoils the decode, then a smoothstep 3t^2 - 2t^3 to 1 at the far
    end of the overlap's middle. Symmetric: ramp(d) + ramp(overlap - d) = 1."""
    margin = BLEND_MARGIN * overlap
    t = ((distance - margin) / (overlap - 2 * margin)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _axis_tiles(length: int, tile: int, overlap: int, scale: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, size) in latent pixels and blend weights (size * scale,) in image pixels for the tiles along one
    axis. Each weight ramps across the overlap with each neighbour (`_ramp`); normalised so that the weights of
    all tiles sum to 1 at every image pixel, so the 2-D weights (outer products) do too: no weight map needed."""
    starts = _tile_starts(length, tile, overlap)
    size = min(tile, length)
    centres = torch.arange(size * scale, dtype=torch.float64) + 0.5  # pixel centres within the tile
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(size * scale, dtype=torch.float64)
        if i > 0:  # overlap with the previous tile: fade in from this tile's left/top border
            w = w * _ramp(centres, (starts[i - 1] + size - start) * scale)
        if i < len(starts) - 1:  # overlap with the next tile: fade out towards the right/bottom border
            w = w * _ramp(size * scale - centres, (start + size - starts[i + 1]) * scale)
        weights.append(w)
    total = torch.zeros(length * scale, dtype=torch.float64)
    for start, w in zip(starts, weights):
        total[start * scale : (start + size) * scale] += w
    return [
        (start, size, (w / total[start * scale : (start + size) * scale]).float())
        for start, w in zip(starts, weights)
    ]


def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
    """Decode (B, 4, h, w) latents in overlapping tiles of at most `tile` x `tile` latent pixels.

    Neighbouring tiles overlap by at least `overlap` latent pixels and are cross-faded there with smooth
    weights; only the output (and one tile's decode) is held in memory. A latent that fits in one tile
    is decoded directly. Returns (B, 3, f*h, f*w) in the decoder's dtype (f = 8 for Stable Diffusion).
    `latents` are the VAE's own (already divided by the scaling factor); they are not modified.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise InvalidInputError(f"tile must be >= 1 and 0 <= overlap < tile; got tile={tile}, overlap={overlap}")
    if latents.ndim != 4:
        raise InvalidInputError(f"latents must be shaped (batch, channels, height, width); got {tuple(latents.shape)}")
    height, width = latents.shape[-2:]
    if height <= tile and width <= tile:
        return vae.decode(latents)
    scale = 2 ** (len(vae.config.block_channels) - 1)  # image pixels per latent pixel
    rows = _axis_tiles(height, tile, overlap, scale)
    cols = _axis_tiles(width, tile, overlap, scale)
    out, dtype = None, None
    for y, tile_h, weight_y in rows:
        for x, tile_w, weight_x in cols:
            image = vae.decode(latents[:, :, y : y + tile_h, x : x + tile_w])  # (B, 3, f*tile_h, f*tile_w)
            if out is None:
                dtype = image.dtype
                out = torch.zeros((*image.shape[:2], height * scale, width * scale), device=image.device)
            weight = (weight_y[:, None] * weight_x[None, :]).to(image.device)  # (f*tile_h, f*tile_w)
            out[:, :, y * scale : (y + tile_h) * scale, x * scale : (x + tile_w) * scale] += image.float() * weight
    return out.to(dtype)


def decode_latents(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    tiled: bool | None = None,
    tile: int = 64,
    overlap: int = 16,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Decode latents (already divided by the scaling factor) to images in [-1, 1], never silently black.

    Decodes in the VAE's dtype, in tiles when `tiled` (None: when the latent has more than 128 x 128
    positions, i.e. a 1024 x 1024 image); untiled, by `decoder` when given (a compiled `vae.decode`,
    compiled.CompiledDecoder). A result with NaN or inf (a float16 VAE overflowing) is decoded
    again by a float32 copy of the VAE, the caller's VAE untouched, and a warning is returned (A1111's NaN
    check and --no-half-vae). Returns (images (B, 3, H, W) in the dtype they were decoded in, warnings).
    Raises NonFiniteError when the latents or the float32 result are not finite.
    """
    if not torch.isfinite(latents).all():
        raise NonFiniteError("latents contain NaN or inf before decoding: sampling diverged; check the model's dtype "
                             "(float16 UNets can overflow) and the sampler settings")
    if tiled is None:
        tiled = latents.shape[-2] * latents.shape[-1] > TILE_ABOVE
    param = next(vae.parameters())

    def decode(model: AutoencoderKL, untiled: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        z = latents.to(param.device, next(model.parameters()).dtype)
        return decode_tiled(model, z, tile, overlap) if tiled else untiled(z)

    name = str(param.dtype).removeprefix("torch.")
    with torch.no_grad():
        images = decode(vae, decoder or vae.decode)
        if torch.isfinite(images).all():
            return images, []
        if torch.finfo(param.dtype).bits >= 32:  # nothing wider to retry in
            raise NonFiniteError(f"the VAE produced NaN or inf in {name}: its weights are probably broken; "
                                 "try another VAE")
        fallback = copy.deepcopy(vae).float()  # a float32 copy; the caller's VAE keeps its dtype
        images = decode(fallback, fallback.decode)
    if not torch.isfinite(images).all():
        raise NonFiniteError(f"the VAE produced NaN or inf in {name} and again in float32: its weights are "
                             "probably broken; try another VAE")
    hint = " (A1111's --no-half-vae)" if param.dtype == torch.float16 else ""
    return images, [f"VAE produced NaNs in {name}; decoded in float32 instead{hint}"]


def latent_preview(latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Cheap RGB previews of (B, 4, h, w) latents as the sampler holds them (scaled): one h x w image each.

    A fixed linear map per latent pixel (A1111's "Approx cheap"), no VAE; the UI scales it up.
    """
    if latents.ndim != 4 or latents.shape[1] != LATENT_RGB.shape[0]:
        raise InvalidInputError(f"latent_preview expects latents shaped (batch, 4, height, width); "
                                f"got {tuple(latents.shape)}")
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), LATENT_RGB)  # (B, h, w, 3) in [-1, 1]
    pixels = ((rgb * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return [PIL.Image.fromarray(p.numpy()) for p in pixels]
