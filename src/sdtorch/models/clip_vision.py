"""CLIP vision tower (Radford et al. 2021): the image encoder IP-Adapter conditions on.

    image ──preprocess──▶ pixels (B,3,224,224) ──patch conv 14x14──▶ (B,256,W)
          ──[class token; patches] + positions──▶ pre_layrnorm ──▶ layers (full attention) ──▶ hidden states (B,257,W)
          class token of the last ──post_layernorm──visual_projection──▶ image_embeds (B,P)

IP-Adapter (base) projects `image_embeds`; IP-Adapter Plus resamples the penultimate layer's hidden states
(transformers' `hidden_states[-2]`). Two towers serve the released adapters, both OpenCLIP models with GELU:
ViT-H/14 (`VIT_H_14`, width 1280, 32 layers; SD1.5 adapters and SDXL's "vit-h" ones) and ViT-bigG/14 (`VIT_BIGG_14`,
width 1664, 48 layers; `ip-adapter_sdxl`). OpenAI's ViT-L/14 differs only in QuickGELU and its sizes.

Parameter names give `state_dict()` keys identical to transformers' `CLIPVisionModelWithProjection`. The transformer
layers are the text encoder's (clip.py), without the causal mask. `preprocess` resizes, crops and normalises as
transformers' `CLIPImageProcessor` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

from ..configs import _check, _check_sizes, _from_diffusers, _require_keys
from ..errors import InvalidInputError
from .clip import _ACTIVATIONS, CLIPEncoder, _embedding

# OpenAI CLIP's per-channel pixel statistics (every released CLIP image processor uses them)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_VISION_LAYERS = 64  # bigG has 48; more is a corrupt config


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower's shape (transformers' `CLIPVisionConfig` under sdtorch's field names)."""

    width: int = 1280  # hidden_size
    num_layers: int = 32
    num_heads: int = 16
    mlp_width: int = 5120  # intermediate_size
    projection_dim: int = 1024  # width of image_embeds
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    activation: str = "gelu"  # "gelu" (OpenCLIP ViT-H, bigG) or "quick_gelu" (OpenAI ViT-L)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        part = "CLIP vision"
        _check_sizes(part, width=self.width, num_heads=self.num_heads, mlp_width=self.mlp_width,
                     projection_dim=self.projection_dim, image_size=self.image_size, patch_size=self.patch_size,
                     num_channels=self.num_channels)
        _check(1 <= self.num_layers <= MAX_VISION_LAYERS,
               f"{part} config: num_layers must be between 1 and {MAX_VISION_LAYERS}, not {self.num_layers}")
        _check(self.width % self.num_heads == 0,
               f"{part} config: width {self.width} is not divisible by num_heads {self.num_heads}")
        _check(self.patch_size <= self.image_size,
               f"{part} config: patch_size {self.patch_size} exceeds image_size {self.image_size}")
        _check(self.activation in _ACTIVATIONS,
               f"{part} config: activation {self.activation!r} is not one of {sorted(_ACTIVATIONS)}")
        _check(0 < self.layer_norm_eps < 1,
               f"{part} config: layer_norm_eps must be between 0 and 1, not {self.layer_norm_eps}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(
        cls, cfg: dict[str, Any], source: str = "transformers CLIP vision config"
    ) -> CLIPVisionConfig:
        """From a transformers config.json (parsed): a `CLIPVisionConfig`, or a whole `CLIPConfig`'s vision_config."""
        if isinstance(cfg.get("vision_config"), dict):
            cfg = {"projection_dim": cfg.get("projection_dim", 512), **cfg["vision_config"]}
        _require_keys(cfg, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
        return _from_diffusers(cls, dict(
            width=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            mlp_width=cfg["intermediate_size"],
            projection_dim=cfg.get("projection_dim", 512),
            image_size=cfg.get("image_size", 224),
            patch_size=cfg.get("patch_size", 32),
            num_channels=cfg.get("num_channels", 3),
            activation=cfg.get("hidden_act", "quick_gelu"),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        ), source)

    def to_transformers(self) -> dict[str, Any]:
        """The config.json of transformers' `CLIPVisionModelWithProjection` with this shape."""
        return {
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model",
            "hidden_size": self.width,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.mlp_width,
            "projection_dim": self.projection_dim,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "hidden_act": self.activation,
            "layer_norm_eps": self.layer_norm_eps,
        }


VIT_H_14 = CLIPVisionConfig()  # OpenCLIP ViT-H/14 (laion2B): IP-Adapter's SD1.5 and SDXL "vit-h" image encoder
VIT_BIGG_14 = CLIPVisionConfig(width=1664, num_layers=48, num_heads=16, mlp_width=8192, projection_dim=1280)


@dataclass
class CLIPVisionOutput:
    """What the vision tower computes.

    image_embeds: (B, projection_dim), the projected, normed class token. last_hidden_state: (B, 1 + patches, width).
    hidden_states: with `output_hidden_states`, transformers' tuple: the embeddings after pre_layrnorm, then each
    layer's output (num_layers + 1 tensors, the last equal to last_hidden_state); else None.
    """

    image_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CLIPVisionEmbeddings(nn.Module):
    """Non-overlapping patches (a stride-`patch` conv without bias), a learned class token in front, plus a learned
    absolute position embedding."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(config.width))
        if self.class_embedding.device.type != "meta":
            nn.init.normal_(self.class_embedding)
        self.patch_embedding = nn.Conv2d(config.num_channels, config.width, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = _embedding(config.num_patches + 1, config.width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, S, S) -> (B, 1 + (S/patch)^2, W)."""
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B,C,S,S) -> (B,W,S/p,S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B,W,S/p,S/p) -> (B,N,W)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (W,) -> (B,1,W)
        tokens = torch.cat([cls, patches], dim=1)  # (B,1+N,W)
        return tokens + self.position_embedding.weight  # (1+N, W) broadcast over B


class CLIPVisionTransformer(nn.Module):
    """The tower without its projection: transformers' `vision_model`."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)  # (sic: transformers' name)
        self.encoder = CLIPEncoder(config, causal=False)
        self.post_layernorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)


class CLIPImageEncoder(nn.Module):
    """CLIP's vision tower with its projection: pixels (B, C, S, S) -> image_embeds and hidden states.

    `state_dict()` keys equal transformers' `CLIPVisionModelWithProjection`'s (`vision_model.*`,
    `visual_projection.weight`).
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """pixel_values: (B, C, S, S), normalised as `preprocess` gives them -> CLIPVisionOutput."""
        x = self._embed(pixel_values)  # (B, 1+N, W)
        states = [x]
        for layer in self.vision_model.encoder.layers:
            x = layer(x)
            if output_hidden_states:
                states.append(x)
        pooled = self.vision_model.post_layernorm(x[:, 0])  # class token: (B, W)
        return CLIPVisionOutput(self.visual_projection(pooled), x, tuple(states) if output_hidden_states else None)

    def hidden_state(self, pixel_values: torch.Tensor, index: int = -2) -> torch.Tensor:
        """transformers' `hidden_states[index]` (B, 1+N, W), running only the layers it needs: the default -2 (the
        penultimate layer's output) is what IP-Adapter Plus resamples."""
        count = len(self.vision_model.encoder.layers)
        if not -(count + 1) <= index <= count:
            raise InvalidInputError(f"hidden state index {index} is out of range for {count} layers "
                                    f"(0 .. {count} or -1 .. -{count + 1})")
        x = self._embed(pixel_values)
        for layer in self.vision_model.encoder.layers[: index % (count + 1)]:
            x = layer(x)
        return x

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Checked pixels (B, C, S, S) -> pre-normed token embeddings (B, 1+N, W)."""
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        is_tensor = isinstance(pixel_values, torch.Tensor)
        if not is_tensor or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            got = tuple(pixel_values.shape) if is_tensor else type(pixel_values).__name__
            raise InvalidInputError(f"the CLIP image encoder takes pixels of shape (B, {', '.join(map(str, want))}) "
                                    f"(see clip_vision.preprocess); got {got}")
        if not pixel_values.is_floating_point():
            raise InvalidInputError(f"pixel values must be floating point (normalised), not {pixel_values.dtype}")
        return self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixel_values))


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, transparent pixels composited onto white (as transformers' convert_to_rgb does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(
    images: PIL.Image.Image | Sequence[PIL.Image.Image], size: int = 224,
    mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Images -> the CLIP image encoder's pixels (B, 3, size, size) float32, as `CLIPImageProcessor` prepares them.

    Each image: to RGB; the shorter side resized to `size` with Pillow's bicubic filter (the longer to
    int(size * long / short)); the centre size x size crop (offsets rounded down); values / 255 (in float64, then
    float32); (x - mean) / std per channel.
    """
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(im, PIL.Image.Image) for im in images):
        raise InvalidInputError("preprocess takes a PIL image or a non-empty list of PIL images")
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # (3,1,1)
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    out = []
    for image in images:
        rgb = _to_rgb(image)
        w, h = rgb.size
        if min(w, h) < 1:
            raise InvalidInputError(f"an image of {w}x{h} pixels has nothing to encode")
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        rgb = rgb.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        pixels = torch.from_numpy(np.array(rgb)[top:top + size, left:left + size])  # (S,S,3) uint8
        x = (pixels.permute(2, 0, 1).double() * (1 / 255)).float()  # (3,S,S) in [0, 1]
        out.append((x - mean_t) / std_t)
    return torch.stack(out)  # (B,3,S,S)
