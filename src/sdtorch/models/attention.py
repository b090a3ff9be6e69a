"""Attention building blocks of the UNet: multi-head attention, GEGLU feed-forward, transformer block,
and the SpatialTransformer that runs them over the pixels of a feature map; and IP-Adapter's decoupled
cross-attention to image tokens, which a cross-attention carries while an adapter is installed (models/ip_adapter.py).

Module and parameter names follow diffusers (`to_q`, `to_out.0`, `ff.net.0.proj`, ...) so that a diffusers
state dict loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArchitectureError, InvalidInputError
from .checkpointing import Checkpointable


class ImageCrossAttention(nn.Module):
    """IP-Adapter's decoupled cross-attention to image tokens (Ye et al. 2023, sec. 3.2, eq. 5):

        Z = Attention(Q, K, V) + scale * Attention(Q, K', V'),   K' = c_i W'_k,  V' = c_i W'_v

    Q: the host cross-attention's queries of the pixels, K, V: its keys and values of the text, c_i: the image tokens
    (an image projection's output, `num_tokens` for each of `num_images` images, one after another). The host
    `Attention` holds one of these for each IP-Adapter installed in it (`Attention.add_image_attention`);
    `to_k_ip`/`to_v_ip` are the names in IP-Adapter's files and diffusers' IPAdapterAttnProcessor.
    `scale` and `num_images` may be changed at any time; scale 0 skips the branch.
    """

    def __init__(self, dim: int, context_dim: int, num_tokens: int, scale: float = 1.0):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, dim, bias=False)
        self.num_tokens = num_tokens  # image tokens of one image
        self.num_images = 1
        self.scale = scale

    @property
    def length(self) -> int:
        """How many tokens at the end of the context are this branch's."""
        return self.num_tokens * self.num_images

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """q: (B, heads, L, head_dim), tokens: (B, N, context_dim) -> scale * attention: (B, heads, L, head_dim)."""
        heads = q.shape[1]
        k = self.to_k_ip(tokens).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B,N,dim) -> (B,heads,N,head_dim)
        v = self.to_v_ip(tokens).unflatten(-1, (heads, -1)).transpose(1, 2)
        return self.scale * F.scaled_dot_product_attention(q, k, v)  # (B,heads,L,head_dim)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1).

    Self-attention when `context` is None, cross-attention to `context` otherwise. A cross-attention may carry
    IP-Adapter branches (`image_attentions`, None without): their image tokens are the last tokens of `context`
    (after the text's, in the order the branches were added), split off here and attended by each branch.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ArchitectureError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only so the key reads `to_out.0`
        self.image_attentions: nn.ModuleList | None = None  # a plain attribute until a branch is added

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim), context: (B, M, context_dim) or None -> (B, L, dim).

        With IP-Adapter branches, context is (B, M_text + N_image, context_dim)."""
        images: list[torch.Tensor] = []
        if self.image_attentions is not None and context is not None:
            context, images = self._split_image_tokens(context)
        context = x if context is None else context
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B,L,dim) -> (B,heads,L,head_dim)
        k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B,heads,M,head_dim)
        v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B,heads,M,head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (B,heads,L,head_dim)
        for branch, tokens in zip(self.image_attentions or (), images):
            if branch.scale != 0:
                out = out + branch(q, tokens)  # + scale * Attention(Q, K', V')
        out = out.transpose(1, 2).flatten(2)  # (B,heads,L,head_dim) -> (B,L,dim)
        return self.to_out[0](out)

    def _split_image_tokens(self, context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, M + N, D) -> text (B, M, D) and each branch's image tokens (B, N_i, D), N = sum N_i."""
        lengths = [branch.length for branch in self.image_attentions]
        text = context.shape[1] - sum(lengths)
        if text < 1:
            raise InvalidInputError(
                f"the context has {context.shape[1]} tokens, but the IP-Adapter(s) installed in this UNet take the "
                f"last {sum(lengths)} as image tokens and leave no text: append the image tokens to the text context "
                "(ip_adapter.with_image_tokens)"
            )
        return context[:, :text], list(context[:, text:].split(lengths, dim=1))

    def add_image_attention(self, branch: ImageCrossAttention) -> None:
        """Attach an IP-Adapter branch; its tokens follow those of the branches added before it."""
        if branch.to_k_ip.in_features != self.to_k.in_features or branch.to_k_ip.out_features != self.to_q.out_features:
            raise ArchitectureError(
                f"an IP-Adapter layer mapping {branch.to_k_ip.in_features}-wide image tokens to width "
                f"{branch.to_k_ip.out_features} does not fit a cross-attention of width {self.to_q.out_features} "
                f"over a {self.to_k.in_features}-wide context"
            )
        if self.image_attentions is None:
            self.image_attentions = nn.ModuleList()  # registers it as a submodule
        self.image_attentions.append(branch)

    def remove_image_attention(self, branch: ImageCrossAttention) -> None:
        """Detach a branch; the last one's removal restores the plain module (same modules, same state_dict)."""
        kept = [b for b in self.image_attentions or () if b is not branch]
        del self.image_attentions
        self.image_attentions = nn.ModuleList(kept) if kept else None


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2*inner, the second half gates the first."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B,L,dim) -> 2 x (B,L,inner)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x wider hidden layer: `net.0` (GEGLU), `net.2` (back to dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        # net.1 is diffusers' dropout slot: an Identity here keeps the key numbering (net.0, net.2)
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B,L,dim) -> (B,L,inner) -> (B,L,dim)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text context, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim), context: (B, M, context_dim) -> (B, L, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(Checkpointable):
    """Transformer over the pixels of a feature map, conditioned on the text context, with a residual.

    `use_linear_proj` selects SD2's Linear proj_in/proj_out (applied to tokens) over SD1's 1x1 convs
    (applied to the map); both compute the same function, only the weight shapes differ.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        depth: int = 1,
        use_linear_proj: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.use_linear_proj = use_linear_proj
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = self._projection(channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = self._projection(channels)

    def _projection(self, channels: int) -> nn.Module:
        if self.use_linear_proj:
            return nn.Linear(channels, channels)
        return nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), context: (B, M, context_dim) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear_proj:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B,C,H,W) -> (B,H*W,C)
        if self.use_linear_proj:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_proj:
            tokens = self.proj_out(tokens)
        out = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B,H*W,C) -> (B,C,H,W)
        if not self.use_linear_proj:
            out = self.proj_out(out.contiguous())
        return x + out
