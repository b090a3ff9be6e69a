"""Dataclass configs for every model part, with presets (SD1, SD2, SDXL base and refiner, tiny) and diffusers
conversion.

One config-driven class per model part covers SD1, SD2 and SDXL: the differences live here, as a handful of
fields, not in separate model classes.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .errors import ArchitectureError, InvalidInputError
from .tomlconfig import from_table

T = TypeVar("T")
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear")
# Sizes and counts past these are a corrupt config, not a model (SD's largest: a 49,408-token
# vocabulary, 4 levels, 24 CLIP layers): larger sizes overflow torch's shape arithmetic, and more
# levels and layers would take minutes to build before any weight is compared.
MAX_SIZE = 2**20
MAX_LEVELS = 8
MAX_LAYERS = 32


def _tuple(value: Any, length: int | None = None) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) * (length or 1)


def _check(ok: bool, message: str) -> None:
    """The configs' value checks (`__post_init__`): ArchitectureError(message) unless `ok`."""
    if not ok:
        raise ArchitectureError(message)


def _check_sizes(part: str, **sizes: int | tuple[int, ...]) -> None:
    """Every size (or each entry of a tuple of sizes) is between 1 and MAX_SIZE."""
    for name, value in sizes.items():
        _check(all(1 <= v <= MAX_SIZE for v in _tuple(value)),
               f"{part} config: {name} must be between 1 and {MAX_SIZE:,}, not {value}")


def _check_layers(part: str, **counts: int) -> None:
    """Every layer count is between 1 and MAX_LAYERS."""
    for name, value in counts.items():
        _check(1 <= value <= MAX_LAYERS, f"{part} config: {name} must be between 1 and {MAX_LAYERS}, not {value}")


def _check_norm_groups(part: str, channels: tuple[int, ...], groups: int) -> None:
    """GroupNorm needs every level's channel count to be a multiple of the group count."""
    odd = [c for c in channels if c % groups]
    _check(not odd, f"{part} config: block channels {odd} are not divisible by norm_groups {groups}")


def _require_keys(cfg: dict[str, Any], keys: tuple[str, ...], source: str) -> None:
    """A diffusers config has each of `keys` (those without a default)."""
    missing = [k for k in keys if k not in cfg]
    _check(not missing, f"{source}: lacks {', '.join(missing)}")


def _from_diffusers(cls: type[T], values: dict[str, Any], source: str) -> T:
    """`cls(**values)`, values type-checked (lists become tuples); errors are ArchitectureErrors naming `source`."""
    try:
        return from_table(cls, values, source=source)
    except InvalidInputError as e:
        raise ArchitectureError(str(e)) from None


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet. Levels run from the highest resolution (0) to the lowest."""

    in_channels: int = 4  # 9 for inpainting models: latents + mask + masked-image latents; 8 for instruct-pix2pix:
    # latents + the source image's latents
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # SpatialTransformers per level
    layers_per_block: int = 2  # ResBlocks per down level (up levels have one more)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level (mid block uses the last)
    context_dim: int = 768  # text context width: 768 SD1, 1024 SD2, 2048 SDXL
    use_linear_proj: bool = False  # SD2, SDXL: Linear proj_in/proj_out instead of 1x1 conv
    # Transformer blocks per SpatialTransformer: one count for every level and the mid block (SD1, SD2), or one a
    # level (SDXL: (0, 2, 10)), 0 where a level has no attention; the mid block takes the last level's count.
    transformer_depth: int | tuple[int, ...] = 1
    norm_groups: int = 32
    norm_eps: float = 1e-5
    sample_size: int = 64  # native latent side (64 -> 512 px; SD2's 768 px v-models: 96; SDXL: 128)
    # SDXL's addition embedding (diffusers' "text_time"), added to the timestep embedding: the pooled text
    # embedding and sinusoids of the size/crop numbers ("time ids"), `addition_time_embed_dim` wide each, through
    # Linear-SiLU-Linear. 0: none (SD1, SD2). `addition_in_dim` = pooled width + time ids * addition_time_embed_dim
    # (base: 1280 + 6 * 256 = 2816; refiner: 1280 + 5 * 256 = 2560), diffusers'
    # projection_class_embeddings_input_dim.
    addition_time_embed_dim: int = 0
    addition_in_dim: int = 0

    def __post_init__(self) -> None:
        n = len(self.block_channels)
        _check(1 <= n <= MAX_LEVELS, f"UNet config: {n} levels (block_channels); sdtorch builds 1 to {MAX_LEVELS}")
        if len(self.attention_levels) != n or len(self.num_heads) != n:
            raise ArchitectureError(
                f"UNet config: block_channels, attention_levels and num_heads need one entry per level ({n})"
            )
        _check_sizes("UNet", in_channels=self.in_channels, out_channels=self.out_channels,
                     block_channels=self.block_channels, num_heads=self.num_heads, context_dim=self.context_dim,
                     norm_groups=self.norm_groups, sample_size=self.sample_size)
        _check_layers("UNet", layers_per_block=self.layers_per_block)
        self._check_transformer_depth()
        _check_norm_groups("UNet", self.block_channels, self.norm_groups)
        _check(0 < self.norm_eps < 1, f"UNet config: norm_eps must be between 0 and 1, not {self.norm_eps}")
        self._check_addition()

    def _check_transformer_depth(self) -> None:
        """An int: 1 .. MAX_LAYERS. A tuple: one entry a level, 1 .. MAX_LAYERS where the level has attention
        and for the last level (the mid block's), else 0."""
        depth = self.transformer_depth
        if isinstance(depth, int):
            _check_layers("UNet", transformer_depth=depth)
            return
        n = len(self.block_channels)
        _check(len(depth) == n, f"UNet config: transformer_depth {depth} needs one entry per level ({n})")
        for level, (d, attention) in enumerate(zip(depth, self.attention_levels)):
            if attention or level == n - 1:
                mid = " (and the mid block's)" if level == n - 1 else ""
                _check(1 <= d <= MAX_LAYERS, f"UNet config: transformer_depth of level {level}{mid} must be between "
                                             f"1 and {MAX_LAYERS}, not {d}")
            else:
                _check(d == 0, f"UNet config: level {level} has no attention: its transformer_depth must be 0, "
                               f"not {d}")

    def _check_addition(self) -> None:
        """Both addition sizes are 0 (no addition embedding) or both between 1 and MAX_SIZE."""
        sizes = (self.addition_time_embed_dim, self.addition_in_dim)
        if sizes != (0, 0):
            _check(0 not in sizes, f"UNet config: addition_time_embed_dim and addition_in_dim must be both 0 (no "
                                   f"addition embedding) or both set, not {sizes[0]} and {sizes[1]}")
            _check_sizes("UNet", addition_time_embed_dim=sizes[0], addition_in_dim=sizes[1])

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_channels[0]

    @property
    def level_depths(self) -> tuple[int, ...]:
        """Transformer blocks per SpatialTransformer, one entry a level."""
        depth = self.transformer_depth
        return (depth,) * len(self.block_channels) if isinstance(depth, int) else tuple(depth)

    @property
    def mid_depth(self) -> int:
        """Transformer blocks of the mid block's SpatialTransformer: the last level's count."""
        return self.level_depths[-1]

    @property
    def has_addition(self) -> bool:
        """Whether the UNet takes SDXL's pooled text embedding and time ids (the addition embedding)."""
        return self.addition_time_embed_dim > 0

    def to_diffusers(self) -> dict[str, Any]:
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)]
        heads = list(self.num_heads)
        depth = self.transformer_depth
        cfg = {
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
            "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
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
        if self.has_addition:
            cfg.update(addition_embed_type="text_time", addition_time_embed_dim=self.addition_time_embed_dim,
                       projection_class_embeddings_input_dim=self.addition_in_dim)
        return cfg

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = "diffusers UNet config") -> UNetConfig:
        """The config of diffusers' `UNet2DConditionModel` (its config.json, parsed); `source` names it in errors."""
        _require_keys(cfg, ("block_out_channels",), source)
        channels = cfg["block_out_channels"]
        down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        if not isinstance(down, list) or not all(t in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
            raise ArchitectureError(
                f"{source}: down_block_types {reprlib.repr(down)} is not a list of CrossAttnDownBlock2D and "
                "DownBlock2D (sdtorch does not support other UNet blocks yet)"
            )
        # diffusers' `attention_head_dim` is, for SD1/SD2/SDXL, the number of heads per level
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        addition = cfg.get("addition_embed_type")
        unsupported = [k for k in ("class_embed_type", "encoder_hid_dim", "reverse_transformer_layers_per_block")
                       if cfg.get(k)]
        unsupported += [f"addition_embed_type {addition!r}"] if addition not in (None, "text_time") else []
        if unsupported or cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ArchitectureError(f"{source}: uses features sdtorch does not support yet: {unsupported}")
        if addition:
            _require_keys(cfg, ("addition_time_embed_dim", "projection_class_embeddings_input_dim"), source)
        attention = [t == "CrossAttnDownBlock2D" for t in down]
        return _from_diffusers(cls, dict(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            block_channels=channels,
            attention_levels=attention,
            layers_per_block=cfg.get("layers_per_block", 2),
            num_heads=_tuple(heads, len(channels) if isinstance(channels, list) else 1),
            context_dim=cfg.get("cross_attention_dim", 768),
            use_linear_proj=cfg.get("use_linear_projection") or False,
            transformer_depth=_level_depths(cfg.get("transformer_layers_per_block", 1), attention),
            norm_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            sample_size=cfg.get("sample_size") or 64,
            addition_time_embed_dim=cfg["addition_time_embed_dim"] if addition else 0,
            addition_in_dim=cfg["projection_class_embeddings_input_dim"] if addition else 0,
        ), source)


def _level_depths(depth: Any, attention: list[bool]) -> Any:
    """diffusers' `transformer_layers_per_block` as UNetConfig's `transformer_depth`: an int, or a list of equal
    counts, is one count; another list (SDXL's [1, 2, 10]) keeps its counts for levels with attention and the last
    level (the mid block's count), 0 for the others. Values of other types are left for the type check."""
    if not isinstance(depth, list) or not depth:
        return depth
    if all(d == depth[0] for d in depth):
        return depth[0]
    last = len(depth) - 1
    return [d if level == last or (level < len(attention) and attention[level]) else 0
            for level, d in enumerate(depth)]


CONDITIONING_CHANNEL_ORDERS = ("rgb", "bgr")
# Keys of diffusers' UNet2DConditionModel config that its ControlNetModel does not take (the up path, the output).
_NOT_CONTROLNET_KEYS = ("_class_name", "out_channels", "up_block_types", "center_input_sample", "sample_size")


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a trainable
    copy of a UNet's encoder (conv_in, embeddings, down levels, mid block), configured by `unet` (its up path,
    `out_channels` and `sample_size` are not part of a ControlNet), plus the hint encoder that brings the condition
    image to the latents' resolution and a zero-initialised 1x1 conv on each skip and on the mid block's output."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3  # channels of the condition image (RGB)
    # The hint encoder's widths: a 3x3 conv to the first, then per step a 3x3 conv and a stride-2 3x3 conv to the
    # next (the image is downscaled 2 ** (len - 1) times: 8, to the latents' size); diffusers'
    # conditioning_embedding_out_channels.
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # the shuffle ControlNet's: each residual averaged over the image
    conditioning_channel_order: str = "rgb"  # "bgr": the condition image's channels are reversed first

    def __post_init__(self) -> None:
        n = len(self.hint_channels)
        _check(1 <= n <= MAX_LEVELS, f"ControlNet config: {n} hint encoder widths (hint_channels); sdtorch builds "
                                     f"1 to {MAX_LEVELS}")
        _check_sizes("ControlNet", conditioning_channels=self.conditioning_channels,
                     hint_channels=self.hint_channels)
        _check(self.conditioning_channel_order in CONDITIONING_CHANNEL_ORDERS,
               f"ControlNet config: conditioning_channel_order {self.conditioning_channel_order!r} is not one of "
               f"{', '.join(CONDITIONING_CHANNEL_ORDERS)}")

    @property
    def hint_downscale(self) -> int:
        """How many times smaller than the condition image the latents are (8 for every released ControlNet)."""
        return 2 ** (len(self.hint_channels) - 1)

    def to_diffusers(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.unet.to_diffusers().items() if k not in _NOT_CONTROLNET_KEYS}
        cfg = {"_class_name": "ControlNetModel", **cfg}
        cfg.update(
            conditioning_channels=self.conditioning_channels,
            conditioning_embedding_out_channels=list(self.hint_channels),
            global_pool_conditions=self.global_pool_conditions,
            controlnet_conditioning_channel_order=self.conditioning_channel_order,
        )
        return cfg

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = "diffusers ControlNet config") -> ControlNetConfig:
        """The config of diffusers' `ControlNetModel` (its config.json, parsed); `source` names it in errors."""
        # the ControlNetModel's own default context width is 1280 (the UNet's 768 would be wrong)
        unet = UNetConfig.from_diffusers({"cross_attention_dim": 1280, **cfg}, source=source)
        return _from_diffusers(cls, dict(
            unet=dataclasses.asdict(unet),
            conditioning_channels=cfg.get("conditioning_channels", 3),
            hint_channels=cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256),
            global_pool_conditions=cfg.get("global_pool_conditions") or False,
            conditioning_channel_order=cfg.get("controlnet_conditioning_channel_order") or "rgb",
        ), source)


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

    def __post_init__(self) -> None:
        n = len(self.block_channels)
        _check(1 <= n <= MAX_LEVELS, f"VAE config: {n} levels (block_channels); sdtorch builds 1 to {MAX_LEVELS}")
        _check_sizes("VAE", in_channels=self.in_channels, out_channels=self.out_channels,
                     latent_channels=self.latent_channels, block_channels=self.block_channels,
                     norm_groups=self.norm_groups)
        _check_layers("VAE", layers_per_block=self.layers_per_block)
        _check_norm_groups("VAE", self.block_channels, self.norm_groups)
        _check(math.isfinite(self.scaling_factor) and self.scaling_factor > 0,
               f"VAE config: scaling_factor must be a positive number, not {self.scaling_factor}")

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
    def from_diffusers(cls, cfg: dict[str, Any], source: str = "diffusers VAE config") -> VAEConfig:
        """The config of diffusers' `AutoencoderKL` (its config.json, parsed); `source` names it in errors."""
        _require_keys(cfg, ("block_out_channels",), source)
        return _from_diffusers(cls, dict(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_channels=cfg["block_out_channels"],
            layers_per_block=cfg.get("layers_per_block", 2),
            norm_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
        ), source)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer: OpenAI ViT-L/14 (SD1, SDXL), OpenCLIP ViT-H/14 (SD2) or ViT-bigG/14 (SDXL), by
    these fields."""

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
    projection_dim: int = 768  # the pooled embedding's width (used with with_projection; else only recorded)
    hidden_state_output: bool = False  # SDXL: condition on a layer's raw output, the penultimate by default
    with_projection: bool = False  # SDXL's bigG: text_projection gives the pooled embedding

    def __post_init__(self) -> None:
        _check_sizes("text encoder", vocab_size=self.vocab_size, max_length=self.max_length, width=self.width,
                     num_heads=self.num_heads, mlp_width=self.mlp_width, projection_dim=self.projection_dim)
        _check_layers("text encoder", num_layers=self.num_layers)
        _check(0 < self.layer_norm_eps < 1,
               f"text encoder config: layer_norm_eps must be between 0 and 1, not {self.layer_norm_eps}")
        ids = {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        negative = [name for name, value in ids.items() if value < 0]
        _check(not negative, f"text encoder config: {', '.join(negative)} must not be negative")

    def to_diffusers(self) -> dict[str, Any]:
        return {
            "architectures": ["CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"],
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
    def from_diffusers(
        cls, cfg: dict[str, Any], pad_token_id: int = 49407, source: str = "transformers CLIP text config",
        hidden_state_output: bool = False,
    ) -> TextEncoderConfig:
        """The config of transformers' `CLIPTextModel` or `CLIPTextModelWithProjection` (its config.json, parsed);
        `hidden_state_output` as the model family conditions (SDXL); `source` names it in errors."""
        _require_keys(cfg, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
        return _from_diffusers(cls, dict(
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
            hidden_state_output=hidden_state_output,
            with_projection="CLIPTextModelWithProjection" in cfg.get("architectures", ()),
        ), source)


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule (the sampler issue builds on it)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def __post_init__(self) -> None:
        _check_sizes("schedule", num_train_timesteps=self.num_train_timesteps)
        _check(0 < self.beta_start <= self.beta_end < 1,
               f"schedule config: need 0 < beta_start <= beta_end < 1, not {self.beta_start} and {self.beta_end}")
        _check(self.beta_schedule in BETA_SCHEDULES,
               f"schedule config: beta_schedule {self.beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = "diffusers scheduler config") -> ScheduleConfig:
        """The training schedule of a diffusers scheduler_config.json (parsed); `source` names it in errors."""
        return _from_diffusers(cls, dict(
            num_train_timesteps=cfg.get("num_train_timesteps", 1000),
            beta_start=cfg.get("beta_start", 0.00085),
            beta_end=cfg.get("beta_end", 0.012),
            beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
        ), source)


@dataclass(frozen=True)
class ModelConfig:
    """A whole Stable Diffusion model: its parts, family and parameterisation."""

    family: str = "sd1"  # one of FAMILIES; the kind reported to users adds "-inpaint" for 9-channel UNets
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # SDXL: the first of its encoders
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    text_encoder_2: TextEncoderConfig | None = None  # SDXL base's second encoder (OpenCLIP bigG)

    def __post_init__(self) -> None:
        _check(self.family in FAMILIES, f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        _check(self.prediction_type in PREDICTION_TYPES,
               f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if not self.is_sdxl:
            _check(self.text_encoder_2 is None and not self.unet.has_addition,
                   f"a {self.family} model has one text encoder and no addition embedding (those are SDXL's)")
            return
        encoders = self.text_encoders
        _check(self.unet.has_addition, f"an {self.family} UNet needs the addition embedding (addition_in_dim)")
        _check(all(e.hidden_state_output for e in encoders),
               f"{self.family}: every text encoder conditions on a hidden state (hidden_state_output)")
        _check(encoders[-1].with_projection, f"{self.family}: the last text encoder needs its text_projection")
        width = sum(e.width for e in encoders)
        _check(width == self.unet.context_dim,
               f"{self.family}: the text encoders' widths add up to {width}, not the UNet's context_dim "
               f"{self.unet.context_dim}")
        pooled = self.pooled_dim
        _check((self.unet.addition_in_dim - pooled) % self.unet.addition_time_embed_dim == 0
               and self.unet.addition_in_dim > pooled,
               f"{self.family}: addition_in_dim {self.unet.addition_in_dim} is not the pooled width {pooled} plus "
               f"whole time ids of {self.unet.addition_time_embed_dim}")

    @property
    def is_sdxl(self) -> bool:
        return self.family.startswith("sdxl")

    @property
    def text_encoders(self) -> tuple[TextEncoderConfig, ...]:
        """The text encoders in the order their outputs are concatenated (the original files' embedders)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def pooled_dim(self) -> int:
        """SDXL: the pooled text embedding's width (the last encoder's projection); 0 for SD1/SD2."""
        return self.text_encoders[-1].projection_dim if self.is_sdxl else 0

    @property
    def num_time_ids(self) -> int:
        """SDXL: the size/crop numbers the UNet takes (6 for the base, 5 for the refiner); 0 for SD1/SD2."""
        if not self.is_sdxl:
            return 0
        return (self.unet.addition_in_dim - self.pooled_dim) // self.unet.addition_time_embed_dim

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def is_instruct_pix2pix(self) -> bool:
        """An image-editing model (Brooks et al. 2023): the UNet reads the source image's latents beside its own."""
        return self.unet.in_channels == 8

    @property
    def kind(self) -> str:
        return self.family + ("-inpaint" if self.is_inpainting else "-instruct-pix2pix" if self.is_instruct_pix2pix
                              else "")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["text_encoder_2"] is None:  # TOML has no null: an absent key is the default
            del d["text_encoder_2"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "model config") -> ModelConfig:
        """The config of `to_dict` (or a TOML table); unknown keys and wrong types are errors naming `source`."""
        return from_table(cls, d, source=source)


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

# SDXL's UNets: head width 64, linear proj, the text_time addition embedding of the pooled OpenCLIP bigG
# embedding (1280) and the size/crop numbers, 256 wide each.
SDXL_UNET = UNetConfig(  # base: time ids (original h, w, crop top, left, target h, w)
    block_channels=(320, 640, 1280), attention_levels=(False, True, True), num_heads=(5, 10, 20),
    context_dim=2048, use_linear_proj=True, transformer_depth=(0, 2, 10), sample_size=128,
    addition_time_embed_dim=256, addition_in_dim=1280 + 6 * 256,
)
SDXL_REFINER_UNET = UNetConfig(  # refiner: time ids (original h, w, crop top, left, aesthetic score)
    block_channels=(384, 768, 1536, 1536), attention_levels=(False, True, True, False), num_heads=(6, 12, 24, 24),
    context_dim=1280, use_linear_proj=True, transformer_depth=4, sample_size=128,
    addition_time_embed_dim=256, addition_in_dim=1280 + 5 * 256,
)
# SDXL's text encoders: OpenAI CLIP ViT-L/14 (all 12 layers kept) and OpenCLIP ViT-bigG/14 with its projection,
# both conditioning on the penultimate layer's raw output.
SDXL_CLIP_L = TextEncoderConfig(hidden_state_output=True)
SDXL_CLIP_G = TextEncoderConfig(
    width=1280, num_layers=32, num_heads=20, mlp_width=5120, activation="gelu", pad_token_id=0,
    projection_dim=1280, hidden_state_output=True, with_projection=True,
)
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
SDXL = ModelConfig(family="sdxl", unet=SDXL_UNET, vae=SDXL_VAE, text_encoder=SDXL_CLIP_L,
                   text_encoder_2=SDXL_CLIP_G)
SDXL_REFINER = ModelConfig(family="sdxl-refiner", unet=SDXL_REFINER_UNET, vae=SDXL_VAE, text_encoder=SDXL_CLIP_G)

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

# SDXL in miniature: two encoders of widths 32 + 64 (the second with a 32-wide projection), levels without and
# with attention, transformer depth 1 and 2, 6 time ids (refiner: the second encoder only, 5 time ids).
_TINY_CLIP_L = TextEncoderConfig(width=32, num_layers=3, num_heads=2, mlp_width=64, projection_dim=32,
                                 hidden_state_output=True)
_TINY_CLIP_G = dataclasses.replace(_TINY_CLIP_L, width=64, num_heads=4, mlp_width=128, activation="gelu",
                                   pad_token_id=0, with_projection=True)
TINY_SDXL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(block_channels=(32, 64), attention_levels=(False, True), layers_per_block=1, num_heads=(1, 2),
                    context_dim=96, use_linear_proj=True, transformer_depth=(0, 2), addition_time_embed_dim=8,
                    addition_in_dim=32 + 6 * 8),
    vae=dataclasses.replace(TINY_SD1.vae, scaling_factor=0.13025),
    text_encoder=_TINY_CLIP_L,
    text_encoder_2=_TINY_CLIP_G,
)
TINY_SDXL_REFINER = TINY_SDXL.replace(
    family="sdxl-refiner",
    unet=dataclasses.replace(TINY_SDXL.unet, context_dim=64, addition_in_dim=32 + 5 * 8),
    text_encoder=_TINY_CLIP_G,
    text_encoder_2=None,
)

# ControlNets for the tiny models' UNets, with a narrow hint encoder (4 widths: the image is 8x the latents, as in SD).
TINY_SD1_CONTROLNET = ControlNetConfig(unet=TINY_SD1.unet, hint_channels=(8, 16, 32, 32))
TINY_SDXL_CONTROLNET = ControlNetConfig(unet=TINY_SDXL.unet, hint_channels=(8, 16, 32, 32))

PRESETS: dict[str, ModelConfig] = {
    "sd1": SD1,
    "sd2": SD2,
    "sd2-base": SD2_BASE,
    "sdxl": SDXL,
    "sdxl-refiner": SDXL_REFINER,
    "tiny-sd1": TINY_SD1,
    "tiny-sd2": TINY_SD2,
    "tiny-sdxl": TINY_SDXL,
    "tiny-sdxl-refiner": TINY_SDXL_REFINER,
}
