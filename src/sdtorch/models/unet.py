"""The denoising UNet of Stable Diffusion 1.x / 2.x (Rombach et al. 2022) and SDXL (Podell et al. 2023), driven
by `UNetConfig`.

    x (B,Cin,H,W) -> conv_in -> down levels: ResBlocks [+ SpatialTransformers], stride-2 conv ──skips──┐
                                  mid: ResBlock, SpatialTransformer, ResBlock                          │
    (B,Cout,H,W) <- conv_out <- up levels: [concat skip, ResBlock [+ transformer]]..., 2x upsample <───┘

Every ResBlock receives the timestep embedding (SDXL: plus the addition embedding of the pooled text embedding
and the size/crop numbers); every SpatialTransformer attends to the text context.
Module names reproduce diffusers' `UNet2DConditionModel` state-dict keys exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import UNetConfig
from ..errors import InvalidInputError
from .attention import SpatialTransformer
from .checkpointing import Checkpointable

SHALLOW_STAGES = 1  # split_forward's default: the first down level's stages in the shallow part (DeepCache's layer 0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, sec. 3.5; DDPM's time encoding), cos first.

    t: (B,) float or int timesteps -> (B, dim) float32, [cos(t*f_i), sin(t*f_i)] with
    f_i = max_period**(-i / (dim/2)), i = 0 .. dim/2-1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B,) -> (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class _EmbeddingMLP(nn.Module):
    """Linear-SiLU-Linear from features to the time embedding width (`linear_1`, `linear_2`)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, in_dim) -> (B, embed_dim) in the dtype of the weights."""
        features = features.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(features)))


class TimeEmbedding(_EmbeddingMLP):
    """Sinusoidal timestep features followed by Linear-SiLU-Linear."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> (B, embed_dim) in the dtype of the weights."""
        return self.project(timestep_embedding(t, self.in_dim))  # (B, in_dim) -> (B, embed_dim)


class AdditionEmbedding(_EmbeddingMLP):
    """SDXL's conditioning on the pooled text embedding and the size/crop numbers (Podell et al. 2023, sec. 2.2):
    each number gets the timestep's sinusoid, `time_dim` wide; these follow the pooled embedding into
    Linear-SiLU-Linear. diffusers' `add_embedding` ("text_time"); `label_emb.0` in the original layout."""

    def __init__(self, in_dim: int, time_dim: int, embed_dim: int):
        super().__init__(in_dim, embed_dim)
        self.time_dim = time_dim

    def forward(self, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        """text_embeds: (B, P), time_ids: (B, N), P + N * time_dim = in_dim -> (B, embed_dim)."""
        ids = timestep_embedding(time_ids.flatten(), self.time_dim)  # (B*N,) -> (B*N, time_dim)
        ids = ids.unflatten(0, time_ids.shape).flatten(1)  # (B*N, time_dim) -> (B, N*time_dim)
        return self.project(torch.cat([text_embeds.to(ids.dtype), ids], dim=-1))  # (B, P + N*time_dim)


class ResBlock(Checkpointable):
    """Two GroupNorm-SiLU-conv3x3 stages with the timestep embedding added in between, plus a residual
    (a 1x1 conv `conv_shortcut` when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, H, W), emb: (B, time_dim) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B,Cin,H,W) -> (B,Cout,H,W)
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B,Cout) -> (B,Cout,1,1), broadcast
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B,C,H,W) -> (B,C,H/2,W/2)


class Upsample(nn.Module):
    """Double the resolution (or match the skip's, for odd sizes, as diffusers does): nearest, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B,C,H,W) -> (B,C,2H,2W) or `size`


def _transformer(channels: int, heads: int, depth: int, config: UNetConfig) -> SpatialTransformer:
    return SpatialTransformer(
        channels, heads, config.context_dim,
        depth=depth, use_linear_proj=config.use_linear_proj, norm_groups=config.norm_groups,
    )


def _level_transformers(count: int, channels: int, level: int, config: UNetConfig) -> nn.ModuleList | None:
    """`count` SpatialTransformers for a level with attention; None for a level without."""
    if not config.attention_levels[level]:
        return None
    heads, depth = config.num_heads[level], config.level_depths[level]
    return nn.ModuleList(_transformer(channels, heads, depth, config) for _ in range(count))


class DownBlock(nn.Module):
    """One down level: `layers_per_block` ResBlocks (each followed by a SpatialTransformer on attention
    levels), then an optional Downsample. Every stage's output is kept as a skip for the up path."""

    def __init__(self, in_channels: int, out_channels: int, level: int, config: UNetConfig, downsample: bool):
        super().__init__()
        time_dim, groups, eps = config.time_embed_dim, config.norm_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if j == 0 else out_channels, out_channels, time_dim, groups, eps)
            for j in range(config.layers_per_block)
        )
        self.attentions = _level_transformers(len(self.resnets), out_channels, level, config)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None
        self.level = level  # names the level in errors

    def stage(self, j: int, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Stage j: ResBlock j, then SpatialTransformer j on attention levels. (B,Cin,H,W) -> (B,C,H,W)."""
        x = self.resnets[j](x, emb)
        return x if self.attentions is None else self.attentions[j](x, context)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor],
        intrablock: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the level, appending each stage's output to `skips`.

        intrablock: a T2I-Adapter's feature for this level (diffusers' `down_intrablock_additional_residuals`),
        added where diffusers adds it: on a level with attention, to the last stage's output (before the
        Downsample); on a level without, to the level's output (after the Downsample, if any). Either way the
        skip taken there carries it."""
        last = len(self.resnets) - 1
        for j in range(len(self.resnets)):
            x = self.stage(j, x, emb, context)
            if intrablock is not None and self.attentions is not None and j == last:
                x = self.add_intrablock(x, intrablock)  # (B,C,H,W) + (B|1,C,H,W)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B,C,H,W) -> (B,C,H/2,W/2)
            skips.append(x)
        if intrablock is not None and self.attentions is None:
            x = self.add_intrablock(x, intrablock)  # (B,C,H',W') + (B|1,C,H',W'), H' = H/2 after a Downsample
            skips[-1] = x  # the skip taken here carries it too (diffusers adds in place)
        return x

    def add_intrablock(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """x + a T2I-Adapter's feature for this level, which must broadcast to x's shape."""
        return x + _fitting(feature, x, f"down_intrablock_additional_residuals[{self.level}]", "the down level's "
                            "output where the UNet adds it")


class MidBlock(nn.Module):
    """The lowest resolution: ResBlock, SpatialTransformer, ResBlock."""

    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        time_dim, groups, eps = config.time_embed_dim, config.norm_groups, config.norm_eps
        self.resnets = nn.ModuleList(ResBlock(channels, channels, time_dim, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([_transformer(channels, config.num_heads[-1], config.mid_depth, config)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UpBlock(nn.Module):
    """One up level: `layers_per_block + 1` ResBlocks, each fed the running features concatenated with one
    skip (taken last-in first-out), a SpatialTransformer after each on attention levels, then an optional
    Upsample."""

    def __init__(
        self, in_channels: int, out_channels: int, skip_channels: list[int], level: int, config: UNetConfig,
        upsample: bool,
    ):
        super().__init__()
        time_dim, groups, eps = config.time_embed_dim, config.norm_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResBlock((in_channels if j == 0 else out_channels) + skip, out_channels, time_dim, groups, eps)
            for j, skip in enumerate(skip_channels)
        )
        self.attentions = _level_transformers(len(self.resnets), out_channels, level, config)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, skips: list[torch.Tensor],
        start: int = 0, stop: int | None = None,
    ) -> torch.Tensor:
        """Runs stages [start, stop) of the level (all of it and the Upsample by default), consuming their
        skips from the end of `skips`."""
        stop = len(self.resnets) if stop is None else stop
        for j in range(start, stop):
            x = torch.cat([x, skips.pop()], dim=1)  # (B,C,H,W) + (B,Cskip,H,W) -> (B,C+Cskip,H,W)
            x = self.resnets[j](x, emb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if stop < len(self.resnets):
            return x
        if self.upsamplers is not None:  # to the next level's skip size: 2H, or 2H - 1 where a downsample rounded up
            x = self.upsamplers[0](x, skips[-1].shape[2:])  # (B,C,H,W) -> (B,C,~2H,~2W)
        return x


def broadcast_timesteps(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as a tensor on x's device; a scalar (or one value) is broadcast to x's batch: () -> (B,)."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0 or t.shape == (1,):
        t = t.reshape(1).expand(x.shape[0])  # () -> (B,)
    return t


def check_inputs(cfg: UNetConfig, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
    """The latents, timesteps and context fit a UNet (or a ControlNet's copy of its encoder) of config `cfg`."""
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise InvalidInputError(
            f"UNet input must be (B, {cfg.in_channels}, H, W) latents; got shape {tuple(x.shape)}"
        )
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise InvalidInputError(
            f"timesteps must be a scalar or of shape ({x.shape[0]},); got shape {tuple(t.shape)}"
        )
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
        raise InvalidInputError(
            f"context must be (B={x.shape[0]}, L, {cfg.context_dim}); got shape {tuple(context.shape)}"
        )


def check_addition(
    cfg: UNetConfig, batch: int, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None
) -> None:
    """SDXL's extra conditioning is given exactly where `cfg` has the addition embedding, in the shapes it takes."""
    given = (text_embeds is not None, time_ids is not None)
    if not cfg.has_addition:
        if any(given):
            raise InvalidInputError("this UNet (SD1/SD2) takes no text_embeds or time_ids; only SDXL UNets do")
        return
    width, total = cfg.addition_time_embed_dim, cfg.addition_in_dim
    need = (f"text_embeds (B={batch}, P), the pooled text embedding, and time_ids (B={batch}, N), the size/crop "
            f"numbers, with P + N * {width} = {total}")
    if not all(given):
        raise InvalidInputError(f"this SDXL UNet needs {need}")
    if not (text_embeds.ndim == time_ids.ndim == 2 and text_embeds.shape[0] == time_ids.shape[0] == batch
            and text_embeds.shape[1] + time_ids.shape[1] * width == total):
        raise InvalidInputError(
            f"this SDXL UNet needs {need}; got shapes {tuple(text_embeds.shape)} and {tuple(time_ids.shape)}"
        )


def _with_residuals(
    skips: list[torch.Tensor], residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None, total: int
) -> list[torch.Tensor]:
    """The skips with a ControlNet's down residuals added (the first len(skips) of the `total` a UNet has), as
    diffusers' `down_block_additional_residuals`; the skips themselves where there are none."""
    if residuals is None:
        return skips
    if len(residuals) != total:
        raise InvalidInputError(f"down_block_additional_residuals needs one tensor for each of the UNet's {total} "
                                f"skips; got {len(residuals)}")
    return [skip + _fitting(residual, skip, f"down_block_additional_residuals[{i}]", f"skip {i}")
            for i, (skip, residual) in enumerate(zip(skips, residuals))]


def intrablock_points(cfg: UNetConfig) -> list[tuple[int, int]]:
    """Where a UNet of config `cfg` adds a T2I-Adapter's features (`down_intrablock_additional_residuals`), in
    order: one point a down level, then the mid block's output (an optional last feature), each as (channels,
    downscale from the latents): a level with attention adds after its last stage, before its Downsample (level l:
    2**l); one without adds after its Downsample (2**(l+1); the last level has none: 2**l). SD1: (320, 1),
    (640, 2), (1280, 4), (1280, 8), mid (1280, 8); SDXL: (320, 2), (640, 2), (1280, 4), mid (1280, 4)."""
    levels = len(cfg.block_channels)
    points = []
    for level, (ch, attention) in enumerate(zip(cfg.block_channels, cfg.attention_levels)):
        after_downsample = not attention and level < levels - 1
        points.append((ch, 2 ** (level + after_downsample)))
    points.append((cfg.block_channels[-1], 2 ** (levels - 1)))
    return points


def _intrablock(
    features: list[torch.Tensor] | tuple[torch.Tensor, ...] | None, levels: int
) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
    """A T2I-Adapter's features as (one feature or None for each down level, the mid block's or None): one for
    each level, and optionally one more for the mid block's output (SDXL's adapters have it)."""
    if features is None:
        return [None] * levels, None
    if len(features) not in (levels, levels + 1):
        raise InvalidInputError(f"down_intrablock_additional_residuals needs one tensor for each of the UNet's "
                                f"{levels} down levels (and optionally one more for the mid block); got "
                                f"{len(features)} (a T2I-Adapter for another model family?)")
    features = list(features)
    return features[:levels], (features[levels] if len(features) > levels else None)


def _fitting(residual: torch.Tensor, features: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """`residual` when it broadcasts to `features`' shape (a pooled (B, C, 1, 1) does), else InvalidInputError."""
    try:
        fits = torch.broadcast_shapes(residual.shape, features.shape) == features.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise InvalidInputError(f"{name} has shape {tuple(residual.shape)}; {what} is {tuple(features.shape)}")
    return residual


class UNet(nn.Module):
    """Predicts the noise (or v) in a latent, given the timestep and the text context (SDXL: and the pooled text
    embedding and size/crop numbers).

    `state_dict()` keys equal those of diffusers' `UNet2DConditionModel` built from `config.to_diffusers()`.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_channels
        levels = len(channels)
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.time_embedding = TimeEmbedding(channels[0], config.time_embed_dim)
        if config.has_addition:
            self.add_embedding = AdditionEmbedding(
                config.addition_in_dim, config.addition_time_embed_dim, config.time_embed_dim
            )

        skip_channels = [channels[0]]  # channels of every skip the down path will produce, in order
        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for level, ch in enumerate(channels):
            downsample = level < levels - 1
            self.down_blocks.append(DownBlock(prev, ch, level, config, downsample))
            skip_channels += [ch] * (config.layers_per_block + int(downsample))
            prev = ch

        self.mid_block = MidBlock(prev, config)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            ch = channels[level]
            skips = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(prev, ch, skips, level, config, upsample=level > 0))
            prev = ch

        self.conv_norm_out = nn.GroupNorm(config.norm_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, kernel_size=3, padding=1)

    def embed(
        self, t: torch.Tensor, text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The embedding every ResBlock receives: t: (B,) -> (B, time_embed_dim), plus SDXL's addition embedding
        of text_embeds (B, P) and time_ids (B, N) (checked by `split_forward`)."""
        emb = self.time_embedding(t)  # (B,) -> (B, time_embed_dim)
        if self.config.has_addition:
            emb = emb + self.add_embedding(text_embeds, time_ids)  # (B, P), (B, N) -> (B, time_embed_dim)
        return emb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, *,
        text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
        down_block_additional_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents, t: (B,) timesteps (a scalar is broadcast), context: (B, L,
        context_dim) -> (B, out_channels, H, W). SDXL UNets (`config.has_addition`) also need text_embeds (B, P),
        the pooled text embedding, and time_ids (B, N), the size/crop numbers; other UNets take neither.

        down_block_additional_residuals, mid_block_additional_residual: a ControlNet's residuals (both or
        neither), as diffusers' UNet2DConditionModel takes them: one tensor for each skip of the down path (conv_in's,
        then each stage's and downsampler's, in order), added to the skip before the up path takes it (the down
        path itself runs on unchanged features), and one added to the mid block's output.

        down_intrablock_additional_residuals: a T2I-Adapter's features, as diffusers' UNet2DConditionModel takes
        them: one for each down level, added inside the down path (see `DownBlock.forward`; `intrablock_points`
        lists where), so the rest of the down path and the skips taken after see them; an optional last one is
        added to the mid block's output (before a ControlNet's mid residual). With a ControlNet too, its down
        residuals are added to skips that already carry the adapter's features, as in diffusers."""
        return self.split_forward(
            x, t, context, text_embeds=text_embeds, time_ids=time_ids,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
            down_intrablock_additional_residuals=down_intrablock_additional_residuals,
        )[0]

    def num_skips(self) -> int:
        """How many skips the down path makes (and ControlNet down residuals the UNet takes): conv_in's, each
        stage's and each downsampler's."""
        return 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in self.down_blocks)

    def split_forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, deep: torch.Tensor | None = None,
        shallow: int = SHALLOW_STAGES, *, text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        down_block_additional_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet as step caching (DeepCache, Ma et al. 2023) splits it: a shallow part, conv_in and the first
        `shallow` stages of the first down level with the last `shallow + 1` stages of the last up level (which
        consume their skips), around a deep part, all the rest.

        Without `deep`: the whole UNet; returns (output, deep features), the deep part's output, which is what
        enters the last up level's stage `len - shallow - 1`: (B, C0, H, W). With `deep` (from an earlier
        call, same shapes): only the shallow part, on those features; returns (output, deep).
        shallow: 0 .. layers_per_block; the shallow part's share of the work grows with it.
        text_embeds, time_ids: SDXL's extra conditioning, as in `forward`.
        down_block_additional_residuals, mid_block_additional_residual: a ControlNet's, as in `forward`; with
        `deep`, the shallow part adds the residuals of its own skips (the first `shallow + 1`), and the deep
        features carry those of the call that made them.
        down_intrablock_additional_residuals: a T2I-Adapter's features, as in `forward`; with `deep`, the shallow
        part adds the first level's feature only where it falls inside it (a first level with attention, all of
        whose stages are shallow); the deep features carry the rest.
        emb: `embed(t, text_embeds, time_ids)` computed beforehand, (B, time_embed_dim); the time and addition
        embeddings are then not computed here (a compiled graph takes it, its timesteps' sinusoid made in float32).
        """
        t = broadcast_timesteps(t, x)  # () -> (B,)
        check_inputs(self.config, x, t, context)
        if emb is None:
            check_addition(self.config, x.shape[0], text_embeds, time_ids)
            emb = self.embed(t, text_embeds, time_ids)  # (B,) -> (B, time_embed_dim)
        down_residuals, mid_residual = down_block_additional_residuals, mid_block_additional_residual
        if (down_residuals is None) != (mid_residual is None):
            raise InvalidInputError("ControlNet residuals come in pairs: pass both down_block_additional_residuals "
                                    "and mid_block_additional_residual, or neither")
        level_features, mid_feature = _intrablock(down_intrablock_additional_residuals, len(self.down_blocks))
        first, last = self.down_blocks[0], self.up_blocks[-1]
        if not 0 <= shallow < len(last.resnets):
            raise InvalidInputError(f"shallow must be 0 .. {len(last.resnets) - 1}, got {shallow}")
        split = len(last.resnets) - shallow - 1  # the last up level's first shallow stage

        h = self.conv_in(x)  # (B,Cin,H,W) -> (B,C0,H,W)
        skips = [h]
        if deep is None:
            for block, feature in zip(self.down_blocks, level_features):
                h = block(h, emb, context, skips, feature)
            skips = _with_residuals(skips, down_residuals, len(skips))
            h = self.mid_block(h, emb, context)
            if mid_feature is not None:
                name = f"down_intrablock_additional_residuals[{len(self.down_blocks)}]"
                h = h + _fitting(mid_feature, h, name, "the mid block's output")
            if mid_residual is not None:
                h = h + _fitting(mid_residual, h, "mid_block_additional_residual", "the mid block's output")
            for block in self.up_blocks[:-1]:
                h = block(h, emb, context, skips)
            deep = last(h, emb, context, skips, stop=split)  # leaves the skips of conv_in and `shallow` stages
        else:
            feature = level_features[0] if first.attentions is not None else None  # else added after the Downsample
            for j in range(shallow):
                h = first.stage(j, h, emb, context)
                if feature is not None and j == len(first.resnets) - 1:
                    h = first.add_intrablock(h, feature)
                skips.append(h)
            skips = _with_residuals(skips, down_residuals, self.num_skips())
        h = last(deep, emb, context, skips, start=split)
        return self.conv_out(F.silu(self.conv_norm_out(h))), deep  # (B,C0,H,W) -> (B,Cout,H,W)
