"""The Pipeline: Stable Diffusion's four parts, where they came from, and `__call__` to generate.

`sdtorch.load()` returns one; `pipe("a prompt")` returns images (see `generation.py` for the flow).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from PIL import Image

from .configs import ModelConfig
from .models.clip import CLIPTextEncoder
from .models.tokenizer import CLIPTokenizer
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .sampling.common import Callback


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

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 8 for SD's VAE (2 per downsampling level)."""
        return 2 ** (len(self.config.vae.block_channels) - 1)

    @property
    def default_size(self) -> int:
        """The model's native image side in pixels (512 for SD1, 768 for SD2's v-models)."""
        return self.config.unet.sample_size * self.vae_scale_factor

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's model hash: the first 10 hex digits of the single file's sha256 (None for folders)."""
        if self.report is None or self.report.format != "single_file":
            return None
        digest = hashlib.sha256()
        with open(self.report.source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:10]

    @property
    def model_name(self) -> str | None:
        return Path(self.report.source).stem if self.report is not None else None

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str = "DPM++ 2M",
        schedule: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        image: str | Path | Image.Image | None = None,
        strength: float = 0.8,
        mask_image: str | Path | Image.Image | None = None,
        clip_skip: int = 1,
        callback: Callback | None = None,
        **options,
    ) -> list[Image.Image]:
        """Generate images: txt2img, img2img (`image`, `strength`) or inpainting (`image` + `mask_image`).

        sampler / schedule: A1111 names; schedule None means the sampler's A1111 default (Karras for DPM++ 2M).
        seed: image i of the batch uses seed + i (A1111); None or -1 picks one (reported in the infotext).
        generator: instead of seeds, one torch.Generator drives all noise in diffusers' order.
        options (A1111 names): resize_mode ("just resize" | "crop and resize" | "resize and fill"),
            mask_blur (px, default 4), inpainting_mask_invert, inpaint_full_res (only the masked region, at
            full size) with inpaint_full_res_padding, mask_overlay (paste onto the original, default True),
            eta, guidance_rescale, enable_hr with hr_scale / hr_resize_x / hr_resize_y, hr_upscaler
            ("Latent" | "Latent (nearest)" | "Lanczos"), hr_second_pass_steps, hr_denoising_strength (0.7),
            tiled_decode (None: automatic above 1024 px).
        Returns PIL images; each carries its A1111 text in `img.info["parameters"]` and its seed in `img.info["seed"]`.
        """
        from .generation import build_request, generate

        options.setdefault("mask_blur", 4)
        request = build_request(self, prompt, negative_prompt, num_inference_steps, guidance_scale, sampler, schedule,
                                seed, generator, height, width, num_images_per_prompt, image, strength, mask_image,
                                clip_skip, options)
        return generate(self, request, callback, options)

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules.items()}

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v / 1e6:.1f}M" for k, v in self.parameter_counts().items())
        return f"Pipeline(kind={self.config.kind}, prediction={self.config.prediction_type}, {counts})"
