"""The Pipeline: Stable Diffusion's four parts and what is known about where they came from.

`sdtorch.load()` returns one. Sampling (txt2img / img2img / inpainting) is built on these parts by
the sampler and pipeline modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .configs import ModelConfig
from .models.clip import CLIPTextEncoder
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet
from .models.vae import AutoencoderKL


@dataclass
class LoadReport:
    """What loading found: the source, its format, the detected kind and what was skipped."""

    source: str
    format: str  # "single_file" | "diffusers"
    prediction_type_origin: str  # "detected" | "user" | "file"
    ignored_keys: list[str] = field(default_factory=list)


class Pipeline:
    """Tokenizer, text encoder, UNet and VAE of one Stable Diffusion model."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextEncoder,
        unet: UNet,
        vae: AutoencoderKL,
        config: ModelConfig,
        report: LoadReport | None = None,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.config = config
        self.report = report

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move every model part (in place) and return self."""
        for module in self.modules.values():
            module.to(device=device, dtype=dtype)
        return self

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules.items()}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v / 1e6:.1f}M" for k, v in self.parameter_counts().items())
        return f"Pipeline(kind={self.config.kind}, prediction={self.config.prediction_type}, {counts})"
