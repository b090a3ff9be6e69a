"""A small CLIP trained contrastively (Radford et al. 2021): sdtorch's text encoder learns the captions.

Text tower: `CLIPTextEncoder` (the module SD conditions on), pooled at the first EOS token and
projected, as transformers' `CLIPTextModelWithProjection` does. Image tower: a small CNN written here.
Both embeddings are L2-normalised; the loss is the symmetric InfoNCE over the batch's similarity
matrix scaled by a learned temperature (CLIP's `logit_scale`, capped at 100).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import TextEncoderConfig
from ..errors import ArchitectureError, InvalidInputError
from ..models.clip import CLIPTextEncoder
from .loop import StepFn, TrainState, batch_indices

Tokenizer = Callable[[list[str]], torch.Tensor]  # captions -> ids (B, L), e.g. `CLIPTokenizer`
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class ImageEncoderConfig:
    """The CNN image tower: one stride-2 stage per entry of `channels` (64 px, 4 stages -> 4x4 features)."""

    in_channels: int = 3
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 128)
    width: int = 256  # feature width before the projection
    norm_groups: int = 8

    @property
    def feature_size(self) -> int:
        return self.image_size // 2 ** len(self.channels)


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers; the shared embedding width is `text.projection_dim`."""

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    init_temperature: float = 0.07


class ImageEncoder(nn.Module):
    """Image (B, 3, S, S) in [-1, 1] -> features (B, width).

    Each stage: stride-2 3x3 conv, GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU. The final feature map
    is flattened rather than pooled, so where a shape sits survives into the features.
    """

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        if config.feature_size < 1 or config.image_size % 2 ** len(config.channels):
            raise ArchitectureError(
                f"image tower: image_size {config.image_size} must be a multiple of 2**{len(config.channels)}"
            )
        self.config = config
        layers: list[nn.Module] = []
        prev = config.in_channels
        for ch in config.channels:
            layers += [
                nn.Conv2d(prev, ch, 3, stride=2, padding=1), nn.GroupNorm(config.norm_groups, ch), nn.SiLU(),
                nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(config.norm_groups, ch), nn.SiLU(),
            ]
            prev = ch
        self.stages = nn.Sequential(*layers)
        self.proj = nn.Linear(prev * config.feature_size**2, config.width)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (self.config.in_channels, size, size):
            raise InvalidInputError(
                f"image tower expects (B, {self.config.in_channels}, {size}, {size}) images; got {tuple(images.shape)}"
            )
        x = self.stages(images)  # (B, C, S/2^n, S/2^n)
        return self.norm(self.proj(x.flatten(1)))  # (B, C*s*s) -> (B, width)


class CLIPModel(nn.Module):
    """Text and image towers with projections into one embedding space, and the learned temperature.

    Parameter names follow transformers' `CLIPModel` where it has them (`text_model`,
    `text_projection`, `visual_projection`, `logit_scale`), so `text_model` can be handed to the UNet
    as its text encoder and `text_model` + `text_projection` load into `CLIPTextModelWithProjection`.
    """

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        dim = config.text.projection_dim
        self.text_model = CLIPTextEncoder(config.text)
        self.text_projection = nn.Linear(config.text.width, dim, bias=False)
        self.vision_model = ImageEncoder(config.image)
        self.visual_projection = nn.Linear(config.image.width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> unit-norm embeddings (B, D), pooled at each row's first EOS token."""
        hidden = self.text_model(input_ids)  # (B, L, W)
        eos = (input_ids == self.config.text.eos_token_id).int().argmax(dim=1)  # (B,) first EOS
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]  # (B, W)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> unit-norm embeddings (B, D)."""
        return F.normalize(self.visual_projection(self.vision_model(images)), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B_text, B_image): scaled cosine similarity of every caption with every image."""
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return scale * self.encode_text(input_ids) @ self.encode_image(images).T


def clip_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of the text->image and image->text cross-entropies, pair i the target of row i."""
    target = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return 0.5 * (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.T, target))


def clip_step(
    model: CLIPModel, dataset: Sequence[dict[str, Any]], tokenizer: Tokenizer, *, batch_size: int
) -> StepFn:
    """A step function for `train`: the InfoNCE loss of the batch of (seed, step) (items with "image", "caption")."""
    param = next(model.parameters())

    def step(state: TrainState) -> dict[str, torch.Tensor]:
        items = [dataset[i] for i in batch_indices(state.seed, state.step, batch_size, len(dataset))]
        images = torch.stack([item["image"] for item in items]).to(param.device, param.dtype)  # (B, 3, S, S)
        ids = tokenizer([item["caption"] for item in items]).to(param.device)  # (B, L)
        logits = model(images, ids)  # (B, B)
        loss = clip_loss(logits)
        return {"loss": loss, "temperature": (-model.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE)).exp()}

    return step


@torch.no_grad()
def retrieval_top1(
    model: CLIPModel, images: torch.Tensor, captions: list[str], tokenizer: Tokenizer, batch_size: int = 256
) -> float:
    """Text-to-image top-1 retrieval: the fraction of captions whose most similar image (among all
    `images`, (N, 3, S, S)) is their own, caption i belonging to image i."""
    if len(captions) != images.shape[0]:
        raise InvalidInputError(
            f"need one caption per image, got {len(captions)} captions and {images.shape[0]} images"
        )
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    starts = range(0, len(captions), batch_size)
    image_emb = torch.cat(
        [model.encode_image(images[i : i + batch_size].to(param.device, param.dtype)) for i in starts]
    )  # (N, D)
    text_emb = torch.cat([model.encode_text(tokenizer(captions[i : i + batch_size]).to(param.device)) for i in starts])
    model.train(was_training)
    best = (text_emb @ image_emb.T).argmax(dim=1)  # (N,) index of the best image per caption
    return (best == torch.arange(len(captions), device=best.device)).sum().item() / len(captions)
