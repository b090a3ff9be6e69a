"""CLIP text transformer: the prompt encoder of Stable Diffusion.

One class covers every variant through `TextEncoderConfig`:
- SD1: OpenAI CLIP ViT-L/14 text tower (QuickGELU, 12 layers, width 768).
- SD2: OpenCLIP ViT-H/14 text tower (GELU, width 1024). SD2 conditions on the penultimate block, so
  only the first 23 of its 24 blocks are kept (as diffusers' converted SD2 text encoder does).
  For both, the conditioning is `final_layer_norm(output of the last layer run)`.
- SDXL: ViT-L/14 and OpenCLIP ViT-bigG/14 (`hidden_state_output`): the conditioning is the penultimate
  layer's raw output (no final LayerNorm); bigG's pooled embedding (`with_projection`) is `text_projection`
  of the final-normed last layer at the end-of-text token.

Parameter names give `state_dict()` keys identical to transformers' `CLIPTextModel` /
`CLIPTextModelWithProjection` (without a `text_model.` prefix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import TextEncoderConfig
from ..errors import ArchitectureError, InvalidInputError

if TYPE_CHECKING:
    from ..adapters.embeddings import EmbeddingDatabase
    from .clip_vision import CLIPVisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding initialised as torch's (N(0, 1)), except on the meta device, where loading builds
    models: torch's meta `normal_` imports torch._dynamo, which costs seconds at start-up."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding.

    Token ids from vocab_size on look up `added` (E, W) instead: the vectors of textual-inversion embeddings
    (adapters/embeddings.py), kept apart from the trained table, which they never change.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.position_embedding = _embedding(config.max_length, config.width)

    def forward(self, input_ids: torch.Tensor, added: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        if added is None:
            tokens = self.token_embedding(input_ids)  # (B, L, W)
        else:
            vocab_size = self.token_embedding.num_embeddings
            is_added = input_ids >= vocab_size  # (B, L)
            tokens = self.token_embedding(input_ids.masked_fill(is_added, 0))  # (B, L, W)
            added_rows = F.embedding((input_ids - vocab_size).clamp(min=0), added.to(tokens))  # (B, L, W)
            tokens = torch.where(is_added.unsqueeze(-1), added_rows, tokens)
        return tokens + self.position_embedding(positions)  # (B, L, W)


# The layers below serve the vision tower too (clip_vision.py): both configs have the fields they read (width,
# num_heads, mlp_width, activation, layer_norm_eps, num_layers).


class CLIPAttention(nn.Module):
    """Multi-head self-attention: causal (each token sees itself and the tokens before it) for text, over all tokens
    (`causal=False`) for the image patches of the vision tower."""

    def __init__(self, width: int, num_heads: int, causal: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, -1).transpose(1, 2)  # (B, H, L, W/H)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, W/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, width))  # (B, L, W)


class CLIPMLP(nn.Module):
    """Two-layer feed-forward network: width -> mlp_width -> width."""

    def __init__(self, config: TextEncoderConfig | CLIPVisionConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[config.activation]
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))  # (B, L, mlp_width) -> (B, L, W)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: TextEncoderConfig | CLIPVisionConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.width, config.num_heads, causal)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of transformer blocks."""

    def __init__(self, config: TextEncoderConfig | CLIPVisionConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, causal) for _ in range(config.num_layers))

    def forward(self, x: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Run only the first `num_layers` blocks (the rest would be thrown away)."""
        for layer in self.layers[:num_layers]:
            x = layer(x)
        return x


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer mapping token ids (B, L) to the UNet's context (B, L, width).

    `forward(input_ids, clip_skip=1)`: clip_skip follows A1111's "Clip skip": 1 uses the last kept
    layer, 2 the layer before it, and so on; the final LayerNorm is applied in every case. With
    `hidden_state_output` (SDXL) every choice moves one layer down and is not normed: clip_skip 1 is the
    penultimate layer's output (transformers' `hidden_states[-(clip_skip + 1)]`, diffusers' clip_skip - 1).
    `encode(input_ids, clip_skip)` also returns the pooled embedding of an encoder `with_projection`.

    `textual_inversion` holds the textual-inversion embeddings loaded into this encoder (None: none):
    prompts.tokenize_prompt writes their names as ids from vocab_size on, which look up its vectors.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise ArchitectureError(
                f"text encoder: unknown activation {config.activation!r}; expected one of {sorted(_ACTIVATIONS)}"
            )
        if config.width % config.num_heads:
            raise ArchitectureError(
                f"text encoder: width {config.width} is not divisible by num_heads {config.num_heads}"
            )
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        if config.with_projection:
            self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False)
        self.textual_inversion: EmbeddingDatabase | None = None

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """The conditioning (B, L, width) of token ids (B, L)."""
        x = self._embed(input_ids, clip_skip)
        if self.config.hidden_state_output:
            return self.encoder(x, num_layers=self.config.num_layers - clip_skip)  # (B, L, W), not normed
        return self.final_layer_norm(self.encoder(x, num_layers=self.config.num_layers - clip_skip + 1))

    def encode(self, input_ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(conditioning (B, L, width) as `forward`, pooled embedding (B, projection_dim) or None without
        `with_projection`): the projected final-normed last layer at each row's first end-of-text token."""
        if not self.config.with_projection:
            return self(input_ids, clip_skip), None
        x = self._embed(input_ids, clip_skip)
        kept = self.config.num_layers - clip_skip + (0 if self.config.hidden_state_output else 1)
        context = self.encoder(x, num_layers=kept)  # (B, L, W)
        last = context
        for layer in self.encoder.layers[kept:]:
            last = layer(last)
        last = self.final_layer_norm(last)  # (B, L, W)
        if not self.config.hidden_state_output:
            context = self.final_layer_norm(context)
        ends = (input_ids == self.config.eos_token_id).int().argmax(dim=1)  # (B,) first EOS (0 where none)
        pooled = self.text_projection(last[torch.arange(len(ends), device=last.device), ends])  # (B, P)
        return context, pooled

    def _embed(self, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
        """Checked token ids (B, L) -> token + position embeddings (B, L, W), textual inversion included."""
        added = self.textual_inversion.vectors if self.textual_inversion is not None else None  # (E, W)
        self._check_inputs(input_ids, clip_skip, 0 if added is None else added.shape[0])
        return self.embeddings(input_ids, added)  # (B, L, W)

    def _check_inputs(self, input_ids: torch.Tensor, clip_skip: int, num_added: int) -> None:
        cfg = self.config
        most = cfg.num_layers - int(cfg.hidden_state_output)
        if not isinstance(clip_skip, int) or not 1 <= clip_skip <= most:
            first = "the penultimate layer" if cfg.hidden_state_output else "last layer"
            raise InvalidInputError(f"clip_skip must be an integer from 1 to {most} (1 = {first}), got {clip_skip!r}")
        integer = isinstance(input_ids, torch.Tensor) and input_ids.dtype in (torch.long, torch.int)
        if not integer or input_ids.ndim != 2:
            raise InvalidInputError("input_ids must be an int64 or int32 tensor of shape (batch, length)")
        length = input_ids.shape[1]
        if not 1 <= length <= cfg.max_length:
            raise InvalidInputError(
                f"input_ids have {length} tokens; the text encoder takes 1 to {cfg.max_length} "
                "(split longer prompts into chunks first)"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size + num_added):
            added = f" and {num_added} textual-inversion vectors" if num_added else ""
            raise InvalidInputError(
                f"input_ids must lie in [0, {cfg.vocab_size + num_added}) (the CLIP vocabulary{added})"
            )
