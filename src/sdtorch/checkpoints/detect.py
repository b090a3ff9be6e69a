"""Read a model's architecture from the tensors of an original-layout single file.

Every size comes from a tensor's shape; only what shapes cannot show follows SD's conventions:
UNet heads (8 a level with conv proj as SD1 has, head dim 64 with linear proj as SD2 has), CLIP
head dim 64, and the parameterisation (eps for SD1, v for SD2, as diffusers guesses) unless the
caller says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from torch import Tensor

from ..configs import PREDICTION_TYPES, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import ArchitectureError, InvalidInputError
from .keymaps import TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX, canonical_key

CONV, LINEAR = (4,), (2,)  # dimensions of a conv / linear (or embedding) weight

# Layouts recognised only to say clearly why they cannot be loaded: (key prefix, what it is).
_UNSUPPORTED = [
    ("conditioner.embedders.", "SDXL checkpoints are not supported yet (found conditioner.embedders.*)"),
    (UNET_PREFIX + "label_emb.", "SDXL checkpoints are not supported yet (UNet has label_emb, a class/size embedding)"),
    ("depth_model.", "SD2 depth-to-image checkpoints are not supported yet (found depth_model.*)"),
    ("control_model.", "this is a ControlNet, not a Stable Diffusion checkpoint (found control_model.*)"),
]
_SINGLE_PARTS = [
    ("input_blocks.", "a bare UNet in the original layout"),
    ("encoder.down.", "a bare VAE in the original layout"),
    ("encoder.down_blocks.", "a bare VAE in the diffusers layout (load the diffusers folder it came from)"),
    ("down_blocks.", "a bare UNet in the diffusers layout (load the diffusers folder it came from)"),
    ("text_model.", "a bare CLIP text encoder"),
    ("embeddings.token_embedding.", "a bare CLIP text encoder"),
    ("transformer.resblocks.", "a bare OpenCLIP model"),
    ("lora_", "a LoRA (load it as an adapter on top of a model)"),
]


def _sub(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _shape(sd: dict[str, Tensor], key: str, part: str, ndim: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `sd[key]`, which must have one of the numbers of dimensions `ndim`."""
    if key not in sd:
        raise ArchitectureError(f"{part}: checkpoint lacks {key}, which every Stable Diffusion {part} has")
    shape = tuple(sd[key].shape)
    if len(shape) not in ndim:
        raise ArchitectureError(f"{part}: {key} has shape {shape}; a Stable Diffusion {part} has a "
                                f"{' or '.join(map(str, ndim))}-dimensional one")
    return shape


def _indices(sd: dict[str, Tensor], prefix: str) -> list[int]:
    """Sorted numbers n of the keys `prefix{n}.…`."""
    found = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return sorted(int(n) for n in found if n.isdigit())


def _unet_config(sd: dict[str, Tensor]) -> UNetConfig:
    part = "UNet"
    inputs = _indices(sd, "input_blocks.")
    downsamplers = [k for k in inputs if f"input_blocks.{k}.0.op.weight" in sd]
    group = downsamplers[0] if downsamplers else len(inputs)  # a level: ResBlocks + its downsampler
    per, levels = group - 1, len(inputs) // max(group, 1)
    if per < 1 or len(inputs) != levels * group:
        raise ArchitectureError(f"{part}: {len(inputs)} input blocks do not form levels of ResBlocks and downsamplers")
    first = [1 + level * group for level in range(levels)]  # each level's first ResBlock
    channels = tuple(_shape(sd, f"input_blocks.{k}.0.out_layers.3.weight", part, CONV)[0] for k in first)
    linear = len(_shape(sd, "middle_block.1.proj_in.weight", part, LINEAR + CONV)) == 2
    return UNetConfig(
        in_channels=_shape(sd, "input_blocks.0.0.weight", part, CONV)[1],
        out_channels=_shape(sd, "out.2.weight", part, CONV)[0],
        block_channels=channels,
        attention_levels=tuple(f"input_blocks.{k}.1.proj_in.weight" in sd for k in first),
        layers_per_block=per,
        num_heads=tuple(c // 64 for c in channels) if linear else (8,) * levels,
        context_dim=_shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", part, LINEAR)[1],
        use_linear_proj=linear,
        transformer_depth=len(_indices(sd, "middle_block.1.transformer_blocks.")),
    )


def _vae_config(sd: dict[str, Tensor]) -> VAEConfig:
    part = "VAE"
    levels = _indices(sd, "encoder.down.")
    return VAEConfig(
        in_channels=_shape(sd, "encoder.conv_in.weight", part, CONV)[1],
        out_channels=_shape(sd, "decoder.conv_out.weight", part, CONV)[0],
        latent_channels=_shape(sd, "post_quant_conv.weight", part, CONV)[0],
        block_channels=tuple(_shape(sd, f"encoder.down.{i}.block.0.conv2.weight", part, CONV)[0] for i in levels),
        layers_per_block=len(_indices(sd, "encoder.down.0.block.")),
    )


def _clip_config(sd: dict[str, Tensor]) -> TextEncoderConfig:
    """SD1: OpenAI CLIP in transformers' layout."""
    part = "text encoder"
    vocab, width = _shape(sd, "embeddings.token_embedding.weight", part, LINEAR)
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=_shape(sd, "embeddings.position_embedding.weight", part, LINEAR)[0],
        width=width,
        num_layers=len(_indices(sd, "encoder.layers.")),
        num_heads=width // 64,
        mlp_width=_shape(sd, "encoder.layers.0.mlp.fc1.weight", part, LINEAR)[0],
        activation="quick_gelu",
        pad_token_id=49407,
        projection_dim=width,
    )


def _openclip_config(sd: dict[str, Tensor]) -> TextEncoderConfig:
    """SD2: OpenCLIP; sdtorch keeps all blocks but the last (SD2 conditions on the penultimate)."""
    part = "text encoder"
    vocab, width = _shape(sd, "token_embedding.weight", part, LINEAR)
    blocks = len(_indices(sd, "transformer.resblocks."))
    if blocks < 2:
        raise ArchitectureError(f"{part}: OpenCLIP text tower has {blocks} block(s); SD2 needs at least 2")
    projection = _shape(sd, "text_projection", part, LINEAR) if "text_projection" in sd else None
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=_shape(sd, "positional_embedding", part, LINEAR)[0],
        width=width,
        num_layers=blocks - 1,
        num_heads=width // 64,
        mlp_width=_shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", part, LINEAR)[0],
        activation="gelu",
        pad_token_id=0,
        projection_dim=projection[1] if projection is not None else width,
    )


def _reject_unknown(sd: dict[str, Tensor]) -> None:
    """Raise a clear ArchitectureError unless the keys hold a whole SD1/SD2 model in the original layout."""
    for prefix, message in _UNSUPPORTED:
        if any(k.startswith(prefix) for k in sd):
            raise ArchitectureError(message)
    have = {
        "UNet": any(k.startswith(UNET_PREFIX) for k in sd),
        "VAE": any(k.startswith(VAE_PREFIX) for k in sd),
        "text encoder": any(k.startswith(p) for k in sd for p in TEXT_PREFIXES.values()),
    }
    if all(have.values()):
        return
    expected = f"{UNET_PREFIX}*, {VAE_PREFIX}* and {TEXT_PREFIXES['sd1']}* (SD1) or {TEXT_PREFIXES['sd2']}* (SD2)"
    if any(have.values()):
        found = [p for p, ok in have.items() if ok]
        lacking = [p for p, ok in have.items() if not ok]
        raise ArchitectureError(
            f"checkpoint holds only part of a model ({', '.join(found)}; no {', '.join(lacking)}): "
            f"sdtorch loads whole single files with {expected}"
        )
    for prefix, what in _SINGLE_PARTS:
        if any(k.startswith(prefix) for k in sd):
            raise ArchitectureError(f"this looks like {what}, not a whole Stable Diffusion checkpoint ({expected})")
    heads = Counter(k.split(".", 1)[0] for k in sd)  # first-seen order
    shown = ", ".join(f"{h} ({n} keys)" for h, n in list(heads.items())[:5]) + (" ..." if len(heads) > 5 else "")
    raise ArchitectureError(f"no Stable Diffusion weights found: key prefixes are {shown or 'none'}; "
                            f"expected {expected}")


def infer_config(sd: dict[str, Tensor], prediction_type: str | None = None) -> ModelConfig:
    """Build the ModelConfig an original-layout state dict describes (SD1 / SD2, inpainting or not).

    `prediction_type` ("epsilon" or "v_prediction") overrides the guess, which keys cannot settle:
    epsilon for SD1, v_prediction for SD2 (wrong for the 512px SD2 base models). The returned config's
    `prediction_type` says which one was used.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InvalidInputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    sd = {canonical_key(k): v for k, v in sd.items()}
    _reject_unknown(sd)
    if any(k.startswith(TEXT_PREFIXES["sd1"]) for k in sd):
        family, text = "sd1", _clip_config(_sub(sd, TEXT_PREFIXES["sd1"]))
    else:
        family, text = "sd2", _openclip_config(_sub(sd, TEXT_PREFIXES["sd2"]))
    unet = _unet_config(_sub(sd, UNET_PREFIX))
    if unet.context_dim != text.width:
        raise ArchitectureError(
            f"UNet cross-attention expects {unet.context_dim}-wide text context but the {family} text encoder "
            f"is {text.width} wide: the parts do not belong together"
        )
    prediction_type = prediction_type or ("epsilon" if family == "sd1" else "v_prediction")
    if family == "sd2" and prediction_type == "v_prediction":
        unet = dataclasses.replace(unet, sample_size=96)  # SD2's v-models are the 768 px ones
    return ModelConfig(
        family=family,
        prediction_type=prediction_type,
        unet=unet,
        vae=_vae_config(_sub(sd, VAE_PREFIX)),
        text_encoder=text,
    )
