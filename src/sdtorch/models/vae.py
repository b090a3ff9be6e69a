"""AutoencoderKL: the VAE that maps images in [-1, 1] to latents (4 channels, spatial / 2**(levels-1)) and back.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", section 3.1 and
appendix G. Module and parameter names follow diffusers' `AutoencoderKL`, so a diffusers `vae/` state
dict loads with `load_state_dict(sd, strict=True)` and no renaming. The latent scaling factor is
metadata for the pipeline: nothing in this file multiplies by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import VAEConfig
from ..errors import InvalidInputError

NORM_EPS = 1e-6  # every GroupNorm in the VAE (the UNet uses 1e-5)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a skip (a 1x1 conv when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for the key name `to_out.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C), scale 1/sqrt(C)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero column and row on the right and bottom only: (H, W) -> (H//2, W//2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H+1, W+1) -> (B, C, H//2, W//2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def _resnets(in_channels: int, out_channels: int, num_blocks: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        ResBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_blocks)
    )


class DownLevel(nn.Module):
    """One encoder resolution level: ResBlocks, then a Downsample (none on the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_blocks, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpLevel(nn.Module):
    """One decoder resolution level: ResBlocks, then an Upsample (none on the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, num_blocks, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class MidBlock(nn.Module):
    """ResBlock -> SelfAttention -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])
        self.resnets = nn.ModuleList([ResBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*latent_channels, H/f, W/f), before quant_conv."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = config.block_channels, config.norm_groups
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownLevel(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, downsample=i < last)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = _norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (B, ch[0], H, W)
        for level in self.down_blocks:
            x = level(x)  # halves H and W on all but the last level
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w), after post_quant_conv -> image (B, out_channels, h*f, w*f).

    `up_blocks[0]` is the lowest resolution (diffusers' order; the original layout's `up.0` is the highest).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(config.block_channels)), config.norm_groups
        last = len(ch) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            UpLevel(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, upsample=i < last)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[0], groups)
        self.conv_norm_out = _norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, block_channels[-1], h, w)
        for level in self.up_blocks:
            x = level(x)  # doubles H and W on all but the last level
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, h*f, w*f)


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)), per latent element."""

    def __init__(self, moments: torch.Tensor):
        """`moments`: (B, 2*C, h, w), mean channels first, then log-variance channels."""
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn on the generator's device (a CPU seed gives the same noise anywhere)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """The Stable Diffusion VAE. `encode(image) -> DiagonalGaussian`, `decode(latents) -> image`.

    Images are (B, in_channels, H, W) in [-1, 1]; latents are (B, latent_channels, H/f, W/f) with
    f = 2**(levels-1) (8 for SD). Latents are unscaled: the pipeline multiplies by `scaling_factor`
    after encoding and divides before decoding.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, in_channels, H, W) in [-1, 1] -> posterior over latents (B, latent_channels, H/f, W/f)."""
        _check_shape(x, self.config.in_channels, "image")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2*latent, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f), roughly in [-1, 1]."""
        _check_shape(z, self.config.latent_channels, "latents")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct an image through the posterior mode: decode(encode(x).mode())."""
        return self.decode(self.encode(x).mode())


def _check_shape(t: torch.Tensor, channels: int, what: str) -> None:
    if t.ndim != 4 or t.shape[1] != channels:
        raise InvalidInputError(
            f"VAE expects {what} shaped (batch, {channels}, height, width); got {tuple(t.shape)}"
        )
