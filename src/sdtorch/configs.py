"""Dataclass configs for every model part, with presets (SD1, SD2, tiny) and diffusers conversion.

One config-driven class per model part covers SD1 and SD2 (and later SDXL): the differences live
here, as a handful of fields, not in separate model classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ArchitectureError


def _tuple(value: Any, length: int | None = None) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) * (length or 1)


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet. Levels run from the highest resolution (0) to the lowest."""

    in_channels: int = 4  # 9 for inpainting models: latents + mask + masked-image latents
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # SpatialTransformers per level
    layers_per_block: int = 2  # ResBlocks per down level (up levels have one more)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level (mid block uses the last)
    context_dim: int = 768  # text context width: 768 SD1, 1024 SD2
    use_linear_proj: bool = False  # SD2: Linear proj_in/proj_out instead of 1x1 conv
    transformer_depth: int = 1
    norm_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64  # native latent side (64 -> 512 px; SD2's 768 px v-models: 96)

    def __post_init__(self) -> None:
        n = len(self.block_channels)
        if len(self.attention_levels) != n or len(self.num_heads) != n:
            raise ArchitectureError(
                f"UNet config: block_channels, attention_levels and num_heads need one entry per level ({n})"
            )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_channels[0]

    def to_diffusers(self) -> dict[str, Any]:
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)]
        heads = list(self.num_heads)
        return {
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": list(self.block_channels),
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
            "cross_attention_dim": self.context_dim,
            "use_linear_projection": self.use_linear_proj,
            "transformer_layers_per_block": self.transformer_depth,
            "norm_num_groups": self.norm_groups,
            "norm_eps": self.norm_eps,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "act_fn": "silu",
            "center_input_sample": False,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "sample_size": self.sample_size,
        }

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> UNetConfig:
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        channels = tuple(cfg["block_out_channels"])
        n = len(channels)
        # diffusers' `attention_head_dim` is, for SD1/SD2, the number of heads per level
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        unsupported = [k for k in ("addition_embed_type", "class_embed_type", "encoder_hid_dim") if cfg.get(k)]
        if unsupported or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ArchitectureError(f"UNet config uses features sdtorch does not support yet: {unsupported}")
        depth = cfg.get("transformer_layers_per_block", 1)
        if isinstance(depth, (list, tuple)):
            if len(set(depth)) != 1:
                raise ArchitectureError("UNet config: per-level transformer depth is not supported yet")
            depth = depth[0]
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_channels=channels,
            attention_levels=tuple(t.startswith("CrossAttn") for t in down),
            layers_per_block=cfg.get("layers_per_block", 2),
            num_heads=_tuple(heads, n),
            context_dim=cfg.get("cross_attention_dim", 768),
            use_linear_proj=bool(cfg.get("use_linear_projection", False)),
            transformer_depth=depth,
            norm_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            sample_size=cfg.get("sample_size") or 64,
        )


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL. The scaling factor is metadata for the pipeline; modules never apply it."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # ResBlocks per encoder level (decoder levels have one more)
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    def to_diffusers(self) -> dict[str, Any]:
        n = len(self.block_channels)
        return {
            "_class_name": "AutoencoderKL",
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": self.layers_per_block,
            "norm_num_groups": self.norm_groups,
            "act_fn": "silu",
            "scaling_factor": self.scaling_factor,
        }

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> VAEConfig:
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg.get("layers_per_block", 2),
            norm_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
        )


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer: OpenAI ViT-L/14 (SD1) or OpenCLIP ViT-H/14 (SD2), by these fields."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    num_layers: int = 12  # layers kept; SD2 keeps 23 of OpenCLIP's 24 (it conditions on the penultimate)
    num_heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP)
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 49407  # SD1 pads with <|endoftext|>; SD2 (OpenCLIP) pads with 0
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    projection_dim: int = 768  # recorded for the diffusers config; SD1/SD2 conditioning does not use it

    def to_diffusers(self) -> dict[str, Any]:
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_length,
            "hidden_size": self.width,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.mlp_width,
            "hidden_act": self.activation,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": 1,  # transformers' field is unused by CLIPTextModel; tokenizer decides padding
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "projection_dim": self.projection_dim,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], pad_token_id: int = 49407) -> TextEncoderConfig:
        return cls(
            vocab_size=cfg.get("vocab_size", 49408),
            max_length=cfg.get("max_position_embeddings", 77),
            width=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            mlp_width=cfg["intermediate_size"],
            activation=cfg.get("hidden_act", "quick_gelu"),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
            pad_token_id=pad_token_id,
            bos_token_id=cfg.get("bos_token_id", 49406),
            eos_token_id=cfg.get("eos_token_id", 49407),
            projection_dim=cfg.get("projection_dim", 768),
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule (the sampler issue builds on it)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: its parts, family and parameterisation."""

    family: str = "sd1"  # "sd1" or "sd2"; the kind reported to users adds "-inpaint" for 9-channel UNets
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def kind(self) -> str:
        return self.family + ("-inpaint" if self.is_inpainting else "")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        def build(kind: type, values: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

        return cls(
            family=d.get("family", "sd1"),
            prediction_type=d.get("prediction_type", "epsilon"),
            unet=build(UNetConfig, d.get("unet", {})),
            vae=build(VAEConfig, d.get("vae", {})),
            text_encoder=build(TextEncoderConfig, d.get("text_encoder", {})),
            schedule=build(ScheduleConfig, d.get("schedule", {})),
        )


# Weight dtypes by name, for the command line and recipe files.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

SD1 = ModelConfig()
SD2 = ModelConfig(
    family="sd2",
    prediction_type="v_prediction",
    unet=UNetConfig(num_heads=(5, 10, 20, 20), context_dim=1024, use_linear_proj=True, sample_size=96),  # head dim 64
    text_encoder=TextEncoderConfig(
        width=1024, num_layers=23, num_heads=16, mlp_width=4096, activation="gelu", pad_token_id=0,
        projection_dim=1024,
    ),
)
SD2_BASE = SD2.replace(prediction_type="epsilon", unet=dataclasses.replace(SD2.unet, sample_size=64))  # 512px, eps

# Tiny shapes for tests: the same code paths as SD, small enough for a 2-core CPU. They follow SD's
# conventions (8 UNet heads with conv proj; head dim 64 with linear proj and in CLIP; 32 norm groups),
# so their architecture can be read back from an original-layout file's keys alone.
TINY_SD1 = ModelConfig(
    unet=UNetConfig(
        block_channels=(32, 64), attention_levels=(True, False), layers_per_block=1,
        num_heads=(8, 8), context_dim=128,
    ),
    vae=VAEConfig(block_channels=(32, 64), layers_per_block=1),
    text_encoder=TextEncoderConfig(width=128, num_layers=2, num_heads=2, mlp_width=256, projection_dim=128),
)
TINY_SD2 = TINY_SD1.replace(
    family="sd2",
    prediction_type="v_prediction",
    unet=dataclasses.replace(TINY_SD1.unet, block_channels=(64, 128), num_heads=(1, 2), use_linear_proj=True,
                             sample_size=96),
    text_encoder=dataclasses.replace(TINY_SD1.text_encoder, activation="gelu", pad_token_id=0),
)

PRESETS: dict[str, ModelConfig] = {
    "sd1": SD1,
    "sd2": SD2,
    "sd2-base": SD2_BASE,
    "tiny-sd1": TINY_SD1,
    "tiny-sd2": TINY_SD2,
}
