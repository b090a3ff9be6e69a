"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models"): a small convolutional network that turns a condition image (sketch, depth, pose,
colour palette...) into one feature map for each down level of the UNet, which the UNet adds inside its down path
(`UNet.forward(down_intrablock_additional_residuals=...)`; `models.unet.intrablock_points` says where). Unlike a
ControlNet it does not see the latents or the timestep, so its features can be computed once per image.

    image (B,Cc,H,W) in [0,1] ──pixel unshuffle (f)──▶ (B, Cc*f*f, H/f, W/f) ──[conv_in]──▶ levels ──▶ features
    each level: [2x2 average pool] → [1x1 conv to its width] → residual blocks [→ 1x1 conv out]; its output is one
    feature, and the next level's input

Three layouts, as diffusers' `T2IAdapter` names them (`adapter_type`):
- "full_adapter" (the paper's; SD1/SD2, f = 8): conv_in (3x3), then one level a width, every level after the
  first halving the size, so features at 1/8, 1/16, 1/32, 1/64 of the image (the latents' size and each down
  level's below); residual blocks of a 3x3 conv, ReLU, 1x1 conv.
- "full_adapter_xl" (SDXL, f = 16): the same blocks, but only the third level halves: features at 1/16, 1/16, 1/32,
  1/32 of the image, which SDXL's UNet adds after its first Downsample, in its second and third levels and to the
  mid block's output.
- "light_adapter" (the colour adapter; f = 8): no conv_in; each level a 1x1 conv to a quarter of its width,
  residual blocks of two 3x3 convs, and a 1x1 conv to its width; one more level than `channels` lists (the last
  width again), each after the first halving the size.

Module names reproduce diffusers' `T2IAdapter` state-dict keys without its `adapter.` prefix (the loader,
checkpoints/t2i_adapter_files.py, strips it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configs import MAX_LEVELS, _check, _check_layers, _check_sizes, _from_diffusers
from ..errors import InvalidInputError

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """A T2I-Adapter, in diffusers' `T2IAdapter` fields. The defaults are TencentARC's SD1.4 adapters
    (`t2iadapter_*_sd14v1`); see `T2I_ADAPTER_SDXL` and `T2I_ADAPTER_LIGHT` for the others."""

    in_channels: int = 3  # the condition image's channels: 3 (RGB), 1 for the sketch and canny adapters
    # The levels' widths: one feature each ("light_adapter": one more, the last width again)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2  # residual blocks a level (the light adapter's: 4)
    downscale_factor: int = 8  # the pixel unshuffle's factor f (SDXL's adapters: 16)
    adapter_type: str = "full_adapter"  # one of ADAPTER_TYPES

    def __post_init__(self) -> None:
        n = len(self.channels)
        _check(self.adapter_type in ADAPTER_TYPES, f"T2I-Adapter config: adapter_type {self.adapter_type!r} is not "
                                                   f"one of {', '.join(ADAPTER_TYPES)}")
        _check(1 <= n <= MAX_LEVELS, f"T2I-Adapter config: {n} levels (channels); sdtorch builds 1 to {MAX_LEVELS}")
        _check_sizes("T2I-Adapter", in_channels=self.in_channels, channels=self.channels)
        _check(1 <= self.downscale_factor <= 64, f"T2I-Adapter config: downscale_factor must be between 1 and 64, "
                                                 f"not {self.downscale_factor}")
        _check_layers("T2I-Adapter", num_res_blocks=self.num_res_blocks)
        if self.adapter_type == "light_adapter":
            odd = [c for c in self.channels if c % 4]
            _check(not odd, f"T2I-Adapter config: a light adapter's widths are 4 times its blocks' (channels // 4); "
                            f"{odd} are not multiples of 4")
        if self.adapter_type == "full_adapter_xl":
            # diffusers builds levels 3.. from channels[i] to channels[i]: they must take the width they are given
            _check(all(a == b for a, b in zip(self.channels[2:], self.channels[3:])),
                   f"T2I-Adapter config: a full_adapter_xl's levels after the third keep its width; channels "
                   f"{self.channels} change it")

    @property
    def levels(self) -> list[tuple[int, int, bool]]:
        """(input width, output width, halves the size) for each level, in order."""
        c, kind = self.channels, self.adapter_type
        if kind == "light_adapter":
            widths = (*c, c[-1])
            return [(self.unshuffled_channels if i == 0 else widths[i - 1], w, i > 0) for i, w in enumerate(widths)]
        if kind == "full_adapter_xl":
            return [(c[0] if i == 0 else c[i - 1], w, i == 2) for i, w in enumerate(c)]
        return [(c[0] if i == 0 else c[i - 1], w, i > 0) for i, w in enumerate(c)]

    @property
    def unshuffled_channels(self) -> int:
        """Channels after the pixel unshuffle: in_channels * f * f."""
        return self.in_channels * self.downscale_factor**2

    @property
    def feature_downscales(self) -> list[int]:
        """How many times smaller than the image each feature is: f, then doubled at each level that halves."""
        scales, scale = [], self.downscale_factor
        for _, _, down in self.levels:
            scale *= 2 if down else 1
            scales.append(scale)
        return scales

    @property
    def total_downscale_factor(self) -> int:
        """How many times smaller than the image the last (smallest) feature is; image sides should be multiples
        of it (diffusers' pipelines round the size down to one). 64 for SD1's adapters, 32 for SDXL's."""
        return self.feature_downscales[-1]

    def to_diffusers(self) -> dict[str, Any]:
        return {"_class_name": "T2IAdapter", "in_channels": self.in_channels, "channels": list(self.channels),
                "num_res_blocks": self.num_res_blocks, "downscale_factor": self.downscale_factor,
                "adapter_type": self.adapter_type}

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = "diffusers T2IAdapter config") -> T2IAdapterConfig:
        """The config of diffusers' `T2IAdapter` (its config.json, parsed; its defaults where a key is absent)."""
        return _from_diffusers(cls, dict(
            in_channels=cfg.get("in_channels", 3),
            channels=cfg.get("channels", [320, 640, 1280, 1280]),
            num_res_blocks=cfg.get("num_res_blocks", 2),
            downscale_factor=cfg.get("downscale_factor", 8),
            adapter_type=cfg.get("adapter_type", "full_adapter"),
        ), source)


T2I_ADAPTER_SD1 = T2IAdapterConfig()  # TencentARC/t2iadapter_*_sd14v1 (sketch, canny: in_channels=1)
T2I_ADAPTER_LIGHT = T2IAdapterConfig(channels=(320, 640, 1280), num_res_blocks=4, adapter_type="light_adapter")
T2I_ADAPTER_SDXL = T2IAdapterConfig(downscale_factor=16, adapter_type="full_adapter_xl")  # t2i-adapter-*-sdxl-1.0


class AdapterResBlock(nn.Module):
    """x + conv(ReLU(conv3x3(x))): the second conv is 1x1 in the full adapters, 3x3 in the light one (`block1`,
    `block2`, as in the original code and diffusers)."""

    def __init__(self, channels: int, second_kernel: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, kernel_size=second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(torch.relu(self.block1(x)))  # (B,C,H,W) -> (B,C,H,W)


class AdapterLevel(nn.Module):
    """One level: an optional 2x2 average pool (ceil mode: odd sizes round up, as the UNet's stride-2 convs do),
    then
    - full: a 1x1 conv `in_conv` where the width changes, and the residual blocks at the output width;
    - light: a 1x1 conv `in_conv` to a quarter of the output width, the residual blocks there, a 1x1 `out_conv`."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool, light: bool):
        super().__init__()
        self.downsample = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True) if down else None
        inner = out_channels // 4 if light else out_channels
        self.in_conv = nn.Conv2d(in_channels, inner, kernel_size=1) if light or in_channels != out_channels else None
        self.resnets = nn.Sequential(*(AdapterResBlock(inner, 3 if light else 1) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(inner, out_channels, kernel_size=1) if light else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> (B, Cout, H', W'), H' = ceil(H / 2) where the level halves, else H."""
        if self.downsample is not None:
            x = self.downsample(x)  # (B,Cin,H,W) -> (B,Cin,ceil(H/2),ceil(W/2))
        if self.in_conv is not None:
            x = self.in_conv(x)  # -> (B,inner,H',W')
        x = self.resnets(x)
        return x if self.out_conv is None else self.out_conv(x)  # -> (B,Cout,H',W')


class T2IAdapter(nn.Module):
    """Condition image -> one feature map for each level of the UNet's down path (and SDXL's mid block).

    `state_dict()` keys equal those of diffusers' `T2IAdapter` built from `config.to_diffusers()`, less its
    `adapter.` prefix.
    """

    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config
        light = config.adapter_type == "light_adapter"
        self.unshuffle = nn.PixelUnshuffle(config.downscale_factor)
        self.conv_in = None
        if not light:
            self.conv_in = nn.Conv2d(config.unshuffled_channels, config.channels[0], kernel_size=3, padding=1)
        self.body = nn.ModuleList(
            AdapterLevel(cin, cout, config.num_res_blocks, down, light) for cin, cout, down in config.levels
        )

    @property
    def total_downscale_factor(self) -> int:
        """See `T2IAdapterConfig.total_downscale_factor`."""
        return self.config.total_downscale_factor

    @property
    def downscale_factor(self) -> int:
        """The pixel unshuffle's factor: image sides must be multiples of it."""
        return self.config.downscale_factor

    def forward(self, image: torch.Tensor, scale: float = 1.0) -> list[torch.Tensor]:
        """image: (B, in_channels, H, W), the condition image in [0, 1], H and W multiples of `downscale_factor`.
        scale: diffusers' `adapter_conditioning_scale`, a factor on every feature.

        Returns one feature for each level: (B, C_i, H / s_i, W / s_i) (rounded up) with C_i the level's width and
        s_i `config.feature_downscales[i]`; ready for `UNet.forward(down_intrablock_additional_residuals=...)`
        (repeat them along the batch for classifier-free guidance, as the latents are)."""
        cfg, f = self.config, self.config.downscale_factor
        if image.ndim != 4 or image.shape[1] != cfg.in_channels or image.shape[2] % f or image.shape[3] % f:
            raise InvalidInputError(
                f"the T2I-Adapter's image must be (B, {cfg.in_channels}, H, W) with H and W multiples of {f} "
                f"(best of {cfg.total_downscale_factor}); got shape {tuple(image.shape)}"
            )
        weight = self.body[0].resnets[0].block1.weight
        x = self.unshuffle(image.to(weight.dtype))  # (B,Cc,H,W) -> (B,Cc*f*f,H/f,W/f)
        if self.conv_in is not None:
            x = self.conv_in(x)  # -> (B,C0,H/f,W/f)
        features = []
        for level in self.body:
            x = level(x)
            features.append(x * scale if scale != 1 else x)
        return features
