"""Live previews for /sdapi/v1/progress: a picture of the current x0 estimate, cheaply.

Large latents (SD's 64x64 and up) get A1111's "Approx cheap": each latent pixel maps to one RGB colour by an
affine map, rgb = z @ weight + bias (weight (C, 3)). A1111 ships hand-fitted numbers for SD1's VAE; here the map
is fitted by least squares on the model's own VAE, so any VAE gets its own: encode a few test pictures (flat-
coloured objects, colour fields), pair each latent pixel with its f x f block's mean colour. That is one small
encode at load time, and a preview is then one (h*w, C) @ (C, 3) product. Small latents (up to 16x16, as the
built-in model's 8x8) are decoded by the VAE itself, which costs no more there and shows the true colours that a
linear map cannot always reach.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.shapes import ScenesDataset
from ..images import tensor_to_images
from ..models.vae import AutoencoderKL

FIT_SIZE = 64  # pixels of the fitting pictures (8x8 latents at f = 8)
DECODE_UP_TO = 16 * 16  # latent pixels up to which the VAE decodes a preview


def _fitting_pictures(count: int = 12) -> torch.Tensor:
    """(2 * count, 3, FIT_SIZE, FIT_SIZE) in [-1, 1]: scenes of flat-coloured objects, smooth colour fields,
    hard-edged blocks and flat colours."""
    generator = torch.Generator().manual_seed(0)
    size = (FIT_SIZE, FIT_SIZE)
    scenes = ScenesDataset(count, seed=0, size=FIT_SIZE)
    smooth = F.interpolate(torch.rand(count // 3, 3, 3, 3, generator=generator), size=size, mode="bilinear")
    blocks = F.interpolate(torch.rand(count // 3, 3, 4, 4, generator=generator), size=size, mode="nearest")
    flat = torch.rand(count - 2 * (count // 3), 3, 1, 1, generator=generator).expand(-1, -1, *size)
    fields = torch.cat([smooth, blocks, flat]) * 2 - 1
    return torch.cat([torch.stack([scenes[i]["image"] for i in range(count)]), fields])


class LatentPreview:
    """Preview pictures of latents as the samplers hold them (scaled by the VAE's scaling_factor)."""

    def __init__(self, vae: AutoencoderKL, scale_factor: int):
        """Fit the affine map on `vae` (any device or dtype; the fit runs in float32 on the CPU)."""
        self.vae, self.scale_factor = vae, scale_factor
        parameter = next(vae.parameters())
        pictures = _fitting_pictures()
        with torch.inference_mode():
            latents = vae.encode(pictures.to(parameter.device, parameter.dtype)).mean.float().cpu()
        latents = latents * vae.scaling_factor  # (N, C, h, w)
        colours = F.avg_pool2d(pictures, scale_factor)  # (N, 3, h, w): each latent pixel's block
        x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N*h*w, C)
        y = colours.permute(0, 2, 3, 1).reshape(-1, 3)  # (N*h*w, 3)
        x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1)  # (N*h*w, C+1): the bias column
        solution = torch.linalg.lstsq(x1, y).solution  # (C+1, 3)
        self.weight, self.bias = solution[:-1], solution[-1]  # (C, 3), (3,)

    def image(self, latents: torch.Tensor) -> Image.Image:
        """The preview of one image's latents (C, h, w), at the image's size."""
        if latents.shape[-2] * latents.shape[-1] <= DECODE_UP_TO:
            parameter = next(self.vae.parameters())
            with torch.inference_mode():
                rgb = self.vae.decode((latents[None] / self.vae.scaling_factor).to(parameter))[0].float()
        else:
            rgb = torch.einsum("chw,cr->rhw", latents.float().cpu(), self.weight) + self.bias[:, None, None]
        size = (latents.shape[-1] * self.scale_factor, latents.shape[-2] * self.scale_factor)
        return tensor_to_images(rgb[None])[0].resize(size, Image.Resampling.BILINEAR)
