"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a trainable copy
of the UNet's encoder that reads a condition image (edges, depth, pose...) beside the latents and returns one
residual for each skip of the UNet's down path and one for its mid block, which the UNet adds
(`UNet.forward(down_block_additional_residuals=..., mid_block_additional_residual=...)`).

    cond image (B,3,8H,8W) ──hint encoder──▶ (B,C0,H,W) ──┐
    x (B,4,H,W) ─────────────conv_in───────▶ (B,C0,H,W) ──+──▶ down levels ──▶ mid block
    each skip of the down path ──zero conv (1x1)──▶ down residuals (a list, one a skip)
    the mid block's output     ──zero conv (1x1)──▶ mid residual

The encoder is built from the UNet's own blocks (models/unet.py) and its config; the zero convolutions (and the
hint encoder's last conv) start at zero, so a ControlNet fresh from `from_unet` leaves the UNet's output unchanged
(sec. 3.1 of the paper). Module names reproduce diffusers' `ControlNetModel` state-dict keys exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import ControlNetConfig
from ..errors import InvalidInputError
from .unet import (
    AdditionEmbedding,
    DownBlock,
    MidBlock,
    TimeEmbedding,
    UNet,
    broadcast_timesteps,
    check_addition,
    check_inputs,
)

# The modules a ControlNet copies from its UNet (the same names in both).
ENCODER_MODULES = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")


def _zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 conv whose weight and bias start at zero (the paper's "zero convolution")."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(nn.Module):
    """The condition image to features of the latents' size (the paper's E, sec. 3.2, as the released models
    build it rather than as the paper describes it; diffusers' `ControlNetConditioningEmbedding`, `input_hint_block`
    in the original layout): a 3x3 conv to `channels[0]`, then for each next width a 3x3 conv and a stride-2 3x3
    conv to it, SiLU after each, and a zero-initialised 3x3 conv to the UNet's first width."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, Cc, f*H, f*W) -> (B, C0, H, W), f = 2 ** (len(channels) - 1)."""
        h = F.silu(self.conv_in(image))  # (B,Cc,fH,fW) -> (B,c0,fH,fW)
        for block in self.blocks:
            h = F.silu(block(h))  # every second block halves the resolution
        return self.conv_out(h)  # (B,c_last,H,W) -> (B,C0,H,W)


class ControlNet(nn.Module):
    """Residuals for the UNet from the latents, timestep, text context and a condition image.

    `state_dict()` keys equal those of diffusers' `ControlNetModel` built from `config.to_diffusers()`.
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        unet = config.unet
        channels = unet.block_channels
        levels = len(channels)
        self.conv_in = nn.Conv2d(unet.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimeEmbedding(channels[0], unet.time_embed_dim)
        if unet.has_addition:
            self.add_embedding = AdditionEmbedding(
                unet.addition_in_dim, unet.addition_time_embed_dim, unet.time_embed_dim
            )
        self.controlnet_cond_embedding = HintEncoder(config.conditioning_channels, config.hint_channels, channels[0])

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([_zero_conv(channels[0])])  # one a skip: conv_in's first
        prev = channels[0]
        for level, ch in enumerate(channels):
            downsample = level < levels - 1
            self.down_blocks.append(DownBlock(prev, ch, level, unet, downsample))
            self.controlnet_down_blocks.extend(_zero_conv(ch) for _ in range(unet.layers_per_block + downsample))
            prev = ch
        self.controlnet_mid_block = _zero_conv(prev)
        self.mid_block = MidBlock(prev, unet)

    @classmethod
    def from_unet(
        cls, unet: UNet, hint_channels: tuple[int, ...] = (16, 32, 96, 256), conditioning_channels: int = 3
    ) -> ControlNet:
        """A ControlNet to train for `unet`: its encoder's weights copied from the UNet, the hint encoder fresh
        (PyTorch's default init), the zero convolutions and the hint encoder's last conv at zero (so the UNet's
        output is unchanged until training moves them). On the UNet's device, in its dtype."""
        config = ControlNetConfig(unet=unet.config, conditioning_channels=conditioning_channels,
                                  hint_channels=hint_channels)
        weight = unet.conv_in.weight
        controlnet = cls(config).to(device=weight.device, dtype=weight.dtype)
        for name in ENCODER_MODULES:
            if hasattr(controlnet, name):
                getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        return controlnet

    def num_residuals(self) -> int:
        """How many residuals a call returns: one for each skip of the UNet's down path, and the mid block's."""
        return len(self.controlnet_down_blocks) + 1

    def _check_condition(self, x: torch.Tensor, cond_image: torch.Tensor) -> None:
        cfg, f = self.config, self.config.hint_downscale
        b, _, h, w = x.shape
        want = (cfg.conditioning_channels, f * h, f * w)
        if cond_image.ndim != 4 or cond_image.shape[0] not in (1, b) or tuple(cond_image.shape[1:]) != want:
            raise InvalidInputError(
                f"the ControlNet's condition image must be (B={b} or 1, {want[0]}, {want[1]}, {want[2]}): "
                f"{f} times the latents' {h}x{w}; got shape {tuple(cond_image.shape)} (resize the control image to "
                "the output size)"
            )

    def residual_scales(self, scale: float | Sequence[float] = 1.0, guess_mode: bool = False) -> list[float]:
        """The factor of each residual (down residuals in order, the mid block's last): `scale` for all, or one a
        residual; guess mode (diffusers' `guess_mode`) further weights them from 0.1 for the first skip up to 1 for
        the mid block, evenly in log scale (not for a ControlNet with `global_pool_conditions`, as in diffusers)."""
        n = self.num_residuals()
        if isinstance(scale, (int, float)):
            scales = torch.full((n,), float(scale))
        else:
            scales = torch.as_tensor(list(scale), dtype=torch.float32)
            if scales.shape != (n,):
                raise InvalidInputError(f"scale must be a number or {n} numbers (one a residual, the mid block's "
                                        f"last); got {len(scales)}")
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, n) * scales  # 0.1 .. 1.0
        return scales.tolist()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, cond_image: torch.Tensor,
        scale: float | Sequence[float] = 1.0, *, text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None, guess_mode: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (B, in_channels, H, W) latents, t: (B,) timesteps (a scalar is broadcast), context: (B, L,
        context_dim), cond_image: (B or 1, conditioning_channels, 8H, 8W), the condition image in [0, 1]
        (`config.hint_downscale` times the latents' size); SDXL: text_embeds (B, P) and time_ids (B, N) as the UNet
        takes them. scale: diffusers' `conditioning_scale` (or one number a residual), guess_mode: see
        `residual_scales`.

        Returns (down residuals, mid residual), as diffusers' ControlNetModel: one (B, C_i, H_i, W_i) for each skip
        of the UNet's down path, and (B, C_mid, H_mid, W_mid); with `global_pool_conditions`, each averaged over
        its height and width: (B, C, 1, 1).
        """
        cfg = self.config.unet
        t = broadcast_timesteps(t, x)  # () -> (B,)
        check_inputs(cfg, x, t, context)
        check_addition(cfg, x.shape[0], text_embeds, time_ids)
        self._check_condition(x, cond_image)
        scales = self.residual_scales(scale, guess_mode)
        if self.config.conditioning_channel_order == "bgr":
            cond_image = cond_image.flip(1)

        emb = self.time_embedding(t)  # (B,) -> (B, time_embed_dim), as the UNet's `embed`
        if cfg.has_addition:
            emb = emb + self.add_embedding(text_embeds, time_ids)  # (B, P), (B, N) -> (B, time_embed_dim)
        hint = self.controlnet_cond_embedding(cond_image.to(self.conv_in.weight.dtype))  # -> (B|1, C0, H, W)
        h = self.conv_in(x) + hint  # (B,Cin,H,W) -> (B,C0,H,W)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb, context, skips)
        h = self.mid_block(h, emb, context)

        down = [zero(skip) * s for zero, skip, s in zip(self.controlnet_down_blocks, skips, scales)]
        mid = self.controlnet_mid_block(h) * scales[-1]
        if self.config.global_pool_conditions:
            down = [r.mean(dim=(2, 3), keepdim=True) for r in down]  # (B,C,H,W) -> (B,C,1,1)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid
