"""Image prompts (IP-Adapter) in generation, as diffusers' pipelines run them (`ip_adapter_image`):

    image -> clip_vision.preprocess -> (1, 3, 224, 224) -> the CLIP vision tower -> image embeddings (plus adapters:
             the penultimate hidden states); the negative: zeros (plus: the hidden states of all-zero pixels)
    adapter's projection: embeddings -> tokens (1, N, D), once a job
    every UNet call: the text context (B, L, D) -> (B, L + N, D), CFG's unconditional rows with the negative tokens,
    read by the adapter's key/value weights installed in the UNet's cross-attentions (models/ip_adapter.py) for the
    run, scaled by the unit's weight.

A ControlNet beside it reads the text context alone, as in diffusers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from .models.clip_vision import CLIPImageEncoder, preprocess
from .models.ip_adapter import IPAdapter, install_ip_adapter, remove_ip_adapter, with_image_tokens
from .request import ControlNetUnit


BIGG_WIDTH = 1664  # OpenCLIP ViT-bigG/14's: the A1111 extension's "clip_g" tower; the others count as its "clip_h"


@dataclass
class ImagePrompt:
    """An IP-Adapter unit resolved for a job: the adapter, its tokens for the image and the negative, the scale, and
    how the A1111 ControlNet extension's infotext names it (its module and "name [hash]")."""

    adapter: IPAdapter
    tokens: Tensor  # (1, N, D)
    negative: Tensor  # (1, N, D)
    weight: float
    module: str
    title: str

    def infotext_unit(self) -> ControlNetUnit:
        """The unit as the extension writes an IP-Adapter in its "ControlNet N" infotext (its hidden sliders' values)."""
        return ControlNetUnit(module=self.module, model=self.title, weight=self.weight, processor_res=512,
                              threshold_a=0.5, threshold_b=0.5)


def image_prompt(adapter: IPAdapter, encoder: CLIPImageEncoder, image: Image.Image, weight: float,
                 title: str) -> ImagePrompt:
    """Encode `image` for `adapter` with the vision tower `encoder` (both on the model's device and dtype)."""
    parameter = next(encoder.parameters())
    pixels = preprocess(image).to(parameter.device, parameter.dtype)  # (1, 3, S, S)
    module = "ip-adapter_clip_g" if encoder.config.width == BIGG_WIDTH else "ip-adapter_clip_h"
    with torch.inference_mode():
        positive, negative = adapter.embed_images(encoder, pixels)
        return ImagePrompt(adapter, adapter(positive), adapter(negative), weight, module, title)


@contextmanager
def installed(unet: nn.Module, prompts: list[ImagePrompt]) -> Iterator[None]:
    """The adapters installed in the UNet's cross-attentions, in order, for the duration of the block."""
    done = []
    try:
        for prompt in prompts:
            install_ip_adapter(unet, prompt.adapter, prompt.weight)
            done.append(prompt.adapter)
        yield
    finally:
        for adapter in done:
            remove_ip_adapter(unet, adapter)


def with_prompt_tokens(context: Tensor, prompts: list[ImagePrompt], uncond_rows: int) -> Tensor:
    """context (B, L, D) -> (B, L + sum N_i, D): each prompt's tokens, the negative ones on the first
    `uncond_rows` rows (CFG's unconditional half)."""
    rows = context.shape[0]
    tokens = [torch.cat([p.negative.expand(uncond_rows, -1, -1), p.tokens.expand(rows - uncond_rows, -1, -1)])
              for p in prompts]
    return with_image_tokens(context, *tokens)
