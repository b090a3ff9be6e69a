"""SDXL's text conditioning: its CLIP encoders side by side, and the pooled embedding of the last.

The base model has two encoders (OpenAI CLIP ViT-L/14, then OpenCLIP ViT-bigG/14), the refiner bigG
alone. Each conditions on its penultimate layer's raw output; the UNet's context is those outputs
concatenated along the feature axis, (B, 77, 768 + 1280) for the base, and its addition embedding takes
bigG's pooled embedding (B, 1280) (Podell et al. 2023, sec. 2.1). `encoders.i` holds the original files'
`conditioner.embedders.i`.

The encoders read the same BPE ids and differ only in padding (ViT-L pads with end-of-text, bigG with
id 0): every id after a row's first end-of-text becomes each encoder's own pad id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..configs import ModelConfig, TextEncoderConfig
from ..errors import InvalidInputError
from .clip import CLIPTextEncoder

if TYPE_CHECKING:
    from ..adapters.embeddings import EmbeddingDatabase


class SDXLTextEncoder(nn.Module):
    """Token ids (B, L) -> (context (B, L, sum of widths), pooled (B, P)) from SDXL's text encoders."""

    def __init__(self, configs: Sequence[TextEncoderConfig]):
        super().__init__()
        self.encoders = nn.ModuleList(CLIPTextEncoder(c) for c in configs)

    @property
    def part_widths(self) -> tuple[int, ...]:
        """Each encoder's share of the context's feature axis, in order (prompt emphasis weights each alone)."""
        return tuple(e.config.width for e in self.encoders)

    @property
    def textual_inversion_keys(self) -> tuple[str, ...]:
        """Which vectors of an SDXL embedding file each encoder takes, in order (A1111's `textual_inversion_key`):
        "clip_l" for ViT-L, "clip_g" for bigG (the encoder with the text projection; the refiner's only one)."""
        return tuple("clip_g" if e.config.with_projection else "clip_l" for e in self.encoders)

    @property
    def textual_inversion(self) -> EmbeddingDatabase | None:
        """The textual-inversion embeddings loaded (None: none), as prompts look names up: the first encoder's
        database.

        Each encoder keeps its own `EmbeddingDatabase` with its own vectors; `adapters.embeddings.load_embedding`
        adds every embedding to all of them in the same order with the same count, so the token ids this one
        gives a name index each encoder's vectors for it. Raises InvalidInputError where they are out of step
        (an embedding loaded into one encoder alone).
        """
        databases = [e.textual_inversion for e in self.encoders]
        held = [list(db.counts.items()) if db is not None else [] for db in databases]
        if any(h != held[0] for h in held[1:]):
            raise InvalidInputError(
                "SDXL's text encoders hold different textual-inversion embeddings "
                f"({', '.join(f'{key}: {dict(h)}' for key, h in zip(self.textual_inversion_keys, held))}): "
                "load SDXL embeddings through Pipeline.load_embedding, which loads each into every encoder"
            )
        return databases[0]

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        return self.encode(input_ids, clip_skip)[0]

    def encode(self, input_ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, sum of widths), pooled (B, P)) of token ids (B, L); clip_skip as `CLIPTextEncoder`."""
        parts, pooled = [], None
        for encoder in self.encoders:
            ids = repad(input_ids, encoder.config.eos_token_id, encoder.config.pad_token_id)
            context, pooled = encoder.encode(ids, clip_skip)  # (B, L, W_i), the last encoder's (B, P)
            parts.append(context)
        return torch.cat(parts, dim=-1), pooled


def repad(input_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """input_ids (B, L) with every id after each row's first `eos_token_id` set to `pad_token_id`."""
    is_eos = input_ids == eos_token_id  # (B, L)
    after = (is_eos.int().cumsum(dim=1) - is_eos.int()) > 0  # (B, L): strictly after the first EOS
    return input_ids.masked_fill(after, pad_token_id)


def text_encoder_for(config: ModelConfig) -> CLIPTextEncoder | SDXLTextEncoder:
    """The text encoder of a model config with random weights: SDXL's encoders together, else one CLIP."""
    return SDXLTextEncoder(config.text_encoders) if config.is_sdxl else CLIPTextEncoder(config.text_encoder)
