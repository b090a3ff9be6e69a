"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models"):
an image prompt for a frozen UNet.

    image ──CLIP image encoder──▶ image_embeds (B,E)           [base] ──ImageProjection──▶ tokens (B,4,D)
                            └──▶ hidden_states[-2] (B,257,E) [plus] ──Resampler──────▶ tokens (B,16,D)
    context = [text context (B,M,D); tokens (B,N,D)]  ──UNet──▶  every cross-attention i:
        Z = Attention(Q, K_text, V_text) + scale * Attention(Q, tokens W'_k_i, tokens W'_v_i)     (paper eq. 5)

An `IPAdapter` holds the image projection and one `ImageCrossAttention` (`to_k_ip`, `to_v_ip`) for each of the UNet's
cross-attentions, in the order IP-Adapter's files number them (`cross_attentions`). `install_ip_adapter` attaches
those to the UNet's cross-attentions; the image tokens then travel at the end of the context (`with_image_tokens`),
so the UNet's signature does not change; `remove_ip_adapter` restores the plain modules.

Variants: base (`ImageProjection`: Linear to 4 tokens + LayerNorm; `ip-adapter_sd15`, `ip-adapter_sdxl`, ...) and
plus (`Resampler`, a perceiver over the image encoder's penultimate hidden states; `ip-adapter-plus_sd15`,
`ip-adapter-plus-face_sd15`, `ip-adapter-plus_sdxl_vit-h`). Module names follow diffusers' `ImageProjection` and
`IPAdapterPlusImageProjection`; the original files are read by checkpoints/ip_adapter_files.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import _check, _check_sizes
from ..errors import ArchitectureError, InvalidInputError
from .attention import Attention, ImageCrossAttention
from .clip_vision import CLIPImageEncoder

KINDS = ("base", "plus")
_PARTS = ("down_blocks", "up_blocks", "mid_block")  # the order of diffusers' attn_processors, which numbers the layers


@dataclass(frozen=True)
class IPAdapterConfig:
    """An IP-Adapter's shape (read from its tensors by checkpoints/ip_adapter_files.py)."""

    kind: str  # "base" (ImageProjection of image_embeds) or "plus" (Resampler of hidden states)
    image_embed_dim: int  # base: the image encoder's projection_dim; plus: its width
    cross_attention_dim: int  # the UNet's context width (the tokens' width)
    num_tokens: int  # image tokens for one image (4 base, 16 plus)
    layer_dims: tuple[int, ...]  # the width of each cross-attention it adds to, in the files' order
    # plus only: the Resampler
    hidden_dim: int = 0  # its latents' width (SD1.5: 768, SDXL: 1280)
    depth: int = 0  # blocks (4 in every released model)
    heads: int = 0  # attention heads (hidden/64 in every released model)
    head_dim: int = 64
    ff_dim: int = 0  # the feed-forward's inner width (4 * hidden_dim)

    def __post_init__(self) -> None:
        part = "IP-Adapter"
        _check(self.kind in KINDS, f"{part} config: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        _check(len(self.layer_dims) >= 1, f"{part} config: no cross-attention layers")
        _check_sizes(part, image_embed_dim=self.image_embed_dim, cross_attention_dim=self.cross_attention_dim,
                     num_tokens=self.num_tokens, layer_dims=self.layer_dims)
        if self.kind == "plus":
            _check_sizes(part, hidden_dim=self.hidden_dim, depth=self.depth, heads=self.heads,
                         head_dim=self.head_dim, ff_dim=self.ff_dim)

    @property
    def uses_hidden_states(self) -> bool:
        """Whether it takes the image encoder's penultimate hidden states (plus) rather than image_embeds (base)."""
        return self.kind == "plus"


class ImageProjection(nn.Module):
    """IP-Adapter's image projection: one Linear to `num_tokens` tokens, then LayerNorm on each (diffusers'
    `ImageProjection`; `proj` in the original files)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.image_embeds = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds: (B, E) -> (B, num_tokens, D)."""
        tokens = self.image_embeds(image_embeds).unflatten(-1, (self.num_tokens, -1))  # (B,T*D) -> (B,T,D)
        return self.norm(tokens)


class PerceiverAttention(nn.Module):
    """Multi-head attention of the latents (queries) to the image features and themselves (keys, values), without
    biases (diffusers' `Attention(out_bias=False)`; the original's fused `to_kv` is split into to_k, to_v)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])  # the key reads `to_out.0`

    def forward(self, latents: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """latents: (B, Q, dim), kv: (B, S, dim) -> (B, Q, dim)."""
        q = self.to_q(latents).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B,heads,Q,head_dim)
        k = self.to_k(kv).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B,heads,S,head_dim)
        v = self.to_v(kv).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v: (B,heads,Q,head_dim)
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B,Q,inner) -> (B,Q,dim)


class _GELUProjection(nn.Module):
    """Linear without bias, then GELU (diffusers' `GELU` activation module: `proj`)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class _ResamplerFeedForward(nn.Module):
    """dim -> inner (GELU) -> dim, no biases: `net.0.proj`, `net.2` (net.1: diffusers' dropout slot)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.Sequential(_GELUProjection(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B,Q,dim) -> (B,Q,inner) -> (B,Q,dim)


class ResamplerBlock(nn.Module):
    """One perceiver block (Jaegle et al. 2021; Flamingo's resampler, Alayrac et al. 2022):
    latents += Attn(ln1(latents), [ln0(x); ln1(latents)]); latents += FF(LN(latents))."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_dim: int):
        super().__init__()
        self.ln0 = nn.LayerNorm(dim)  # the image features'
        self.ln1 = nn.LayerNorm(dim)  # the latents'
        self.attn = PerceiverAttention(dim, heads, head_dim)
        self.ff = nn.Sequential(nn.LayerNorm(dim), _ResamplerFeedForward(dim, ff_dim))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (B, S, dim) image features, latents: (B, Q, dim) -> (B, Q, dim)."""
        normed = self.ln1(latents)
        kv = torch.cat([self.ln0(x), normed], dim=1)  # (B, S+Q, dim)
        latents = latents + self.attn(normed, kv)
        return latents + self.ff(latents)


class Resampler(nn.Module):
    """IP-Adapter Plus's image projection: `num_queries` learned latents attend to the projected image features
    through `depth` perceiver blocks, then are projected to the UNet's context width and normed (diffusers'
    `IPAdapterPlusImageProjection`)."""

    def __init__(self, embed_dim: int, output_dim: int, hidden_dim: int, depth: int, heads: int, num_queries: int,
                 head_dim: int = 64, ff_dim: int | None = None):
        super().__init__()
        latents = torch.empty(1, num_queries, hidden_dim)
        if latents.device.type != "meta":
            latents = torch.randn(1, num_queries, hidden_dim) / hidden_dim**0.5
        self.latents = nn.Parameter(latents)  # (1, Q, hidden)
        self.proj_in = nn.Linear(embed_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        ff_dim = 4 * hidden_dim if ff_dim is None else ff_dim
        self.layers = nn.ModuleList(ResamplerBlock(hidden_dim, heads, head_dim, ff_dim) for _ in range(depth))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, S, E) (the image encoder's hidden states) -> (B, Q, output_dim)."""
        x = self.proj_in(features)  # (B,S,E) -> (B,S,hidden)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (1,Q,hidden) -> (B,Q,hidden)
        for block in self.layers:
            latents = block(x, latents)
        return self.norm_out(self.proj_out(latents))  # (B,Q,hidden) -> (B,Q,D)


class IPAdapter(nn.Module):
    """An IP-Adapter: the image projection (`image_proj`) and one decoupled cross-attention branch for each of the
    UNet's cross-attentions (`layers`, in the files' order).

    `adapter(image_embeds)` gives the image tokens to append to the text context; `install_ip_adapter` attaches the
    branches to a UNet. `scale` (all branches) and `num_images` may be changed while installed.
    """

    def __init__(self, config: IPAdapterConfig):
        super().__init__()
        self.config = config
        c = config
        if c.kind == "base":
            self.image_proj: nn.Module = ImageProjection(c.image_embed_dim, c.cross_attention_dim, c.num_tokens)
        else:
            self.image_proj = Resampler(c.image_embed_dim, c.cross_attention_dim, c.hidden_dim, c.depth, c.heads,
                                        c.num_tokens, c.head_dim, c.ff_dim)
        self.layers = nn.ModuleList(ImageCrossAttention(dim, c.cross_attention_dim, c.num_tokens)
                                    for dim in c.layer_dims)

    @property
    def scale(self) -> float:
        """The image prompt's weight (of the first branch; setting it sets every branch's). 0 turns it off."""
        return self.layers[0].scale

    @scale.setter
    def scale(self, value: float) -> None:
        value = float(value)
        if not value == value or abs(value) == float("inf"):
            raise InvalidInputError(f"IP-Adapter scale must be a finite number, not {value}")
        for layer in self.layers:
            layer.scale = value

    @property
    def num_images(self) -> int:
        """Images whose tokens the context carries for this adapter (their tokens follow one another)."""
        return self.layers[0].num_images

    @num_images.setter
    def num_images(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"num_images must be a positive integer, not {value!r}")
        for layer in self.layers:
            layer.num_images = value

    @property
    def num_context_tokens(self) -> int:
        """The tokens this adapter appends to the context: num_tokens * num_images."""
        return self.layers[0].length

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The image tokens (B, num_images * num_tokens, cross_attention_dim) to append to the text context.

        base: image_embeds (B, E) or (B, num_images, E); plus: hidden states (B, S, E) or (B, num_images, S, E).
        """
        per_image = 1 if self.config.kind == "base" else 2  # dims of one image's input
        what = "image_embeds (B, E)" if per_image == 1 else "hidden states (B, S, E)"
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim not in (per_image + 1, per_image + 2):
            got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise InvalidInputError(f"this {self.config.kind} IP-Adapter takes {what}, or with several images a "
                                    f"dimension for them after B; got {got}")
        if image_embeds.shape[-1] != self.config.image_embed_dim:
            raise InvalidInputError(f"this IP-Adapter takes {self.config.image_embed_dim}-wide image embeddings, got "
                                    f"{image_embeds.shape[-1]} (an image encoder that does not fit it?)")
        images = 1 if image_embeds.ndim == per_image + 1 else image_embeds.shape[1]
        if images != self.num_images:
            raise InvalidInputError(f"the embeddings hold {images} image(s) each, but the adapter is set for "
                                    f"{self.num_images}: set adapter.num_images = {images} first")
        batch = image_embeds.shape[0]
        flat = image_embeds.reshape(batch * images, *image_embeds.shape[-per_image:])  # (B*K, [S,] E)
        weight = next(self.image_proj.parameters())
        tokens = self.image_proj(flat.to(weight.dtype))  # (B*K, T, D)
        return tokens.reshape(batch, images * tokens.shape[1], tokens.shape[2])  # (B, K*T, D)

    def embed_images(self, encoder: CLIPImageEncoder, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) inputs for `forward` from pixels (B, 3, S, S) (clip_vision.preprocess), as IP-Adapter
        and diffusers make them: base: image_embeds and zeros; plus: the penultimate hidden states of the images and
        of all-zero pixels."""
        vision = encoder.config
        wanted = vision.width if self.config.uses_hidden_states else vision.projection_dim
        if wanted != self.config.image_embed_dim:
            what = "width" if self.config.uses_hidden_states else "projection_dim"
            raise ArchitectureError(
                f"this IP-Adapter takes {self.config.image_embed_dim}-wide image embeddings, but the image encoder's "
                f"{what} is {wanted}: use the encoder it was trained with (ViT-H/14 for SD1.5 and SDXL 'vit-h' "
                "adapters, ViT-bigG/14 for ip-adapter_sdxl)"
            )
        if self.config.uses_hidden_states:
            return encoder.hidden_state(pixel_values), encoder.hidden_state(torch.zeros_like(pixel_values))
        embeds = encoder(pixel_values).image_embeds  # (B, projection_dim)
        return embeds, torch.zeros_like(embeds)


def cross_attentions(unet: nn.Module) -> list[tuple[str, Attention]]:
    """The UNet's cross-attentions (`...attn2`) in the order IP-Adapter's files number them: that of diffusers'
    `attn_processors`, whose UNet registers down_blocks, up_blocks, then mid_block (file index = 2 * i + 1, as
    every transformer block has a self-attention before it)."""
    found: list[tuple[int, str, Attention]] = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and isinstance(module, Attention):
            parts = [p for p in name.split(".") if p in _PARTS]
            if not parts:
                raise ArchitectureError(f"cross-attention {name} is in none of {', '.join(_PARTS)}")
            found.append((_PARTS.index(parts[0]), name, module))
    found.sort(key=lambda item: item[0])  # stable: module order within each part
    return [(name, module) for _, name, module in found]


def check_fits(adapter: IPAdapter, unet: nn.Module, source: str = "the IP-Adapter") -> list[tuple[str, Attention]]:
    """The UNet's cross-attentions if `adapter` fits them (count, widths, context), else ArchitectureError."""
    targets = cross_attentions(unet)
    cfg = adapter.config
    if len(targets) != len(cfg.layer_dims):
        raise ArchitectureError(f"{source} has {len(cfg.layer_dims)} cross-attention layers, the UNet "
                                f"{len(targets)}: it was made for another model family")
    context = targets[0][1].to_k.in_features
    if cfg.cross_attention_dim != context:
        raise ArchitectureError(f"{source} makes {cfg.cross_attention_dim}-wide image tokens; the UNet's context is "
                                f"{context} wide: it was made for another model family")
    wrong = [f"{name} ({attn.to_q.out_features} vs {dim})" for (name, attn), dim in zip(targets, cfg.layer_dims)
             if attn.to_q.out_features != dim]
    if wrong:
        raise ArchitectureError(f"{source}: {len(wrong)} layer width(s) differ from the UNet's (UNet vs adapter): "
                                f"{', '.join(wrong[:3])}")
    return targets


def install_ip_adapter(unet: nn.Module, adapter: IPAdapter, scale: float | None = None) -> None:
    """Attach `adapter`'s branches to the UNet's cross-attentions (after any adapters installed before it: pass the
    image tokens to `with_image_tokens` in the same order). `scale` sets `adapter.scale` (None: keep it)."""
    targets = check_fits(adapter, unet)
    if any(branch is adapter.layers[0] for branch in targets[0][1].image_attentions or ()):
        raise InvalidInputError("this IP-Adapter is already installed in this UNet")
    if scale is not None:
        adapter.scale = scale
    for (_, attention), branch in zip(targets, adapter.layers):
        attention.add_image_attention(branch)


def remove_ip_adapter(unet: nn.Module, adapter: IPAdapter | None = None) -> None:
    """Detach `adapter` (None: every adapter) from the UNet; with none left the modules are as before installing."""
    for _, attention in cross_attentions(unet):
        for branch in list(attention.image_attentions or ()):
            if adapter is None or any(branch is layer for layer in adapter.layers):
                attention.remove_image_attention(branch)


def installed_ip_adapter_tokens(unet: nn.Module) -> int:
    """How many image tokens the UNet's installed adapters take at the end of the context (0: none installed)."""
    targets = cross_attentions(unet)
    return sum(branch.length for branch in targets[0][1].image_attentions or ()) if targets else 0


def with_image_tokens(context: torch.Tensor, *tokens: torch.Tensor) -> torch.Tensor:
    """The text context (B, M, D) with image tokens appended, one (B or 1, N_i, D) tensor per installed adapter in
    install order -> (B, M + sum N_i, D). Tokens of batch 1 are shared by every row."""
    if context.ndim != 3:
        raise InvalidInputError(f"context must be (B, M, D), got shape {tuple(context.shape)}")
    parts = [context]
    for i, t in enumerate(tokens):
        if t.ndim != 3 or t.shape[0] not in (1, context.shape[0]) or t.shape[2] != context.shape[2]:
            raise InvalidInputError(f"image tokens {i} have shape {tuple(t.shape)}; they must be "
                                    f"(B={context.shape[0]} or 1, N, {context.shape[2]})")
        parts.append(t.to(context).expand(context.shape[0], -1, -1))
    return torch.cat(parts, dim=1)
