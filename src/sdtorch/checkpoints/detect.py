"""Read a model's architecture from the tensors of an original-layout single file.

Every size comes from a tensor's shape; only what shapes cannot show follows SD's conventions:
UNet heads (8 a level with conv proj as SD1 has, head dim 64 with linear proj as SD2 and SDXL have), CLIP
head dim 64, SDXL's number of size/crop numbers (6 for the base, 5 for the refiner, whose fifth is the
aesthetic score) and its VAE scale 0.13025, and the parameterisation (eps for SD1 and SDXL, v for SD2, as
diffusers guesses; v for any file with A1111's / ComfyUI's `v_pred` marker) unless the caller says otherwise.

Kinds: SD1 (`cond_stage_model.transformer.`), SD2 (`cond_stage_model.model.`), SDXL base (conditioner
embedders 0: CLIP ViT-L, 1: OpenCLIP bigG) and refiner (embedder 0: bigG), each also as inpainting
(a 9-channel UNet input).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from torch import Tensor

from ..configs import PREDICTION_TYPES, SDXL_VAE, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import ArchitectureError, InvalidInputError
from .keymaps import (
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    TEXT_PREFIXES,
    UNET_PREFIX,
    V_PRED_KEY,
    VAE_PREFIX,
    canonical_key,
)

CONV, LINEAR = (4,), (2,)  # dimensions of a conv / linear (or embedding) weight
CONDITIONER = "conditioner.embedders."
SDXL_TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}  # (h, w, crop top, left, target h, w) / (..., aesthetic score)
SDXL_SAMPLE_SIZE = 128  # 1024 px

# Layouts recognised only to say clearly why they cannot be loaded: (key prefix, what it is).
_UNSUPPORTED = [
    ("edm_vpred.", "EDM v-prediction checkpoints (found edm_vpred.*) are not supported: sdtorch runs models "
                   "trained on SD's discrete noise schedule"),
    ("edm_mean", "EDM checkpoints such as Playground v2.5 (found edm_mean) are not supported: sdtorch runs models "
                 "trained on SD's discrete noise schedule"),
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


def tensor_shape(sd: dict[str, Tensor], key: str, part: str, ndim: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `sd[key]`, which must have one of the numbers of dimensions `ndim`."""
    if key not in sd:
        raise ArchitectureError(f"{part}: checkpoint lacks {key}, which every Stable Diffusion {part} has")
    shape = tuple(sd[key].shape)
    if len(shape) not in ndim:
        raise ArchitectureError(f"{part}: {key} has shape {shape}; a Stable Diffusion {part} has a "
                                f"{' or '.join(map(str, ndim))}-dimensional one")
    return shape


def block_indices(sd: dict[str, Tensor], prefix: str) -> list[int]:
    """Sorted numbers n of the keys `prefix{n}.…`."""
    found = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    return sorted(int(n) for n in found if n.isdigit())


def _count(sd: dict[str, Tensor], prefix: str) -> int:
    return len(block_indices(sd, prefix))


def unet_config_from_tensors(sd: dict[str, Tensor], out_channels: int | None = None, norm_groups: int = 32) -> UNetConfig:
    """The UNet's sizes from its original-layout tensors (`out_channels` given: a UNet without its output conv, as
    a ControlNet's copy; `norm_groups`, which tensors do not show: SD's 32 unless known); the addition embedding's
    `addition_in_dim` is read here, its split in `infer_config`."""
    part = "UNet"
    inputs = block_indices(sd, "input_blocks.")
    downsamplers = [k for k in inputs if f"input_blocks.{k}.0.op.weight" in sd]
    group = downsamplers[0] if downsamplers else len(inputs)  # a level: ResBlocks + its downsampler
    per, levels = group - 1, len(inputs) // max(group, 1)
    if per < 1 or len(inputs) != levels * group:
        raise ArchitectureError(f"{part}: {len(inputs)} input blocks do not form levels of ResBlocks and downsamplers")
    first = [1 + level * group for level in range(levels)]  # each level's first ResBlock
    channels = tuple(tensor_shape(sd, f"input_blocks.{k}.0.out_layers.3.weight", part, CONV)[0] for k in first)
    attention = tuple(f"input_blocks.{k}.1.proj_in.weight" in sd for k in first)
    linear = len(tensor_shape(sd, "middle_block.1.proj_in.weight", part, LINEAR + CONV)) == 2
    addition = tensor_shape(sd, "label_emb.0.0.weight", part, LINEAR)[1] if "label_emb.0.0.weight" in sd else 0
    return UNetConfig(
        in_channels=tensor_shape(sd, "input_blocks.0.0.weight", part, CONV)[1],
        out_channels=out_channels or tensor_shape(sd, "out.2.weight", part, CONV)[0],
        block_channels=channels,
        attention_levels=attention,
        layers_per_block=per,
        num_heads=tuple(max(1, c // 64) for c in channels) if linear else (8,) * levels,
        context_dim=tensor_shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", part, LINEAR)[1],
        use_linear_proj=linear,
        norm_groups=norm_groups,
        transformer_depth=_transformer_depth(sd, first, attention),
        sample_size=SDXL_SAMPLE_SIZE if addition else 64,
        addition_time_embed_dim=addition,  # a placeholder until infer_config knows the pooled width
        addition_in_dim=addition,
    )


def _transformer_depth(sd: dict[str, Tensor], first: list[int], attention: tuple[bool, ...]) -> int | tuple[int, ...]:
    """Transformer blocks per SpatialTransformer: one count when every level with attention and the mid block
    agree (SD1, SD2, SDXL's refiner), else one a level (SDXL base: (0, 2, 10)), the last being the mid block's."""
    mid = _count(sd, "middle_block.1.transformer_blocks.")
    levels = [_count(sd, f"input_blocks.{k}.1.transformer_blocks.") if a else 0 for k, a in zip(first, attention)]
    if all(d == mid for d, a in zip(levels, attention) if a):
        return mid
    if attention[-1] and levels[-1] != mid:
        raise ArchitectureError(f"UNet: the lowest level has {levels[-1]} transformer blocks and the mid block {mid}; "
                                "sdtorch builds UNets whose mid block has as many as the lowest level")
    return (*levels[:-1], mid)


def _vae_config(sd: dict[str, Tensor]) -> VAEConfig:
    part = "VAE"
    levels = block_indices(sd, "encoder.down.")
    return VAEConfig(
        in_channels=tensor_shape(sd, "encoder.conv_in.weight", part, CONV)[1],
        out_channels=tensor_shape(sd, "decoder.conv_out.weight", part, CONV)[0],
        latent_channels=tensor_shape(sd, "post_quant_conv.weight", part, CONV)[0],
        block_channels=tuple(tensor_shape(sd, f"encoder.down.{i}.block.0.conv2.weight", part, CONV)[0] for i in levels),
        layers_per_block=len(block_indices(sd, "encoder.down.0.block.")),
    )


def _clip_config(sd: dict[str, Tensor], part: str = "text encoder", sdxl: bool = False) -> TextEncoderConfig:
    """OpenAI CLIP in transformers' layout: SD1's, and SDXL's ViT-L (which conditions on a hidden state)."""
    vocab, width = tensor_shape(sd, "embeddings.token_embedding.weight", part, LINEAR)
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=tensor_shape(sd, "embeddings.position_embedding.weight", part, LINEAR)[0],
        width=width,
        num_layers=_count(sd, "encoder.layers."),
        num_heads=max(1, width // 64),
        mlp_width=tensor_shape(sd, "encoder.layers.0.mlp.fc1.weight", part, LINEAR)[0],
        activation="quick_gelu",
        pad_token_id=49407,
        projection_dim=width,
        hidden_state_output=sdxl,
    )


def _openclip_config(sd: dict[str, Tensor], part: str = "text encoder", sdxl: bool = False) -> TextEncoderConfig:
    """OpenCLIP. SD2: sdtorch keeps all blocks but the last (SD2 conditions on the penultimate). SDXL's bigG: all
    blocks (its pooled embedding is the last block's, projected by `text_projection`)."""
    vocab, width = tensor_shape(sd, "token_embedding.weight", part, LINEAR)
    blocks = _count(sd, "transformer.resblocks.")
    if blocks < 2:
        raise ArchitectureError(f"{part}: OpenCLIP text tower has {blocks} block(s); "
                                f"{'SDXL' if sdxl else 'SD2'} needs at least 2")
    if sdxl:
        projection = tensor_shape(sd, "text_projection", part, LINEAR)
        if projection[0] != width:
            raise ArchitectureError(f"{part}: text_projection has shape {projection}; it maps the {width}-wide "
                                    f"text features, so its first dimension must be {width}")
    else:
        projection = tensor_shape(sd, "text_projection", part, LINEAR) if "text_projection" in sd else (width, width)
    return TextEncoderConfig(
        vocab_size=vocab,
        max_length=tensor_shape(sd, "positional_embedding", part, LINEAR)[0],
        width=width,
        num_layers=blocks if sdxl else blocks - 1,
        num_heads=max(1, width // 64),
        mlp_width=tensor_shape(sd, "transformer.resblocks.0.mlp.c_fc.weight", part, LINEAR)[0],
        activation="gelu",
        pad_token_id=0,
        projection_dim=projection[1],
        hidden_state_output=sdxl,
        with_projection=sdxl,
    )


def _sdxl_text_encoders(sd: dict[str, Tensor]) -> tuple[str, list[TextEncoderConfig]]:
    """SDXL's family and text encoders from its conditioner's embedders: ViT-L + bigG (base) or bigG (refiner)."""
    found, layouts = block_indices(sd, CONDITIONER), []
    if found != list(range(len(found))):
        raise ArchitectureError(f"conditioner embedders {found} are not numbered 0, 1, ...: not an SDXL checkpoint")
    for i in found:
        clip, openclip = SDXL_CLIP_PREFIX.format(i), SDXL_OPENCLIP_PREFIX.format(i)
        if any(k.startswith(clip) for k in sd):
            layouts.append(("clip", clip))
        elif any(k.startswith(openclip) for k in sd):
            layouts.append(("openclip", openclip))
        else:
            example = next(k for k in sd if k.startswith(f"{CONDITIONER}{i}."))
            raise ArchitectureError(f"conditioner embedder {i} is neither a CLIP text encoder ({clip}*) nor an "
                                    f"OpenCLIP one ({openclip}*): found {example}")
    kinds = [kind for kind, _ in layouts]
    family = {("clip", "openclip"): "sdxl", ("openclip",): "sdxl-refiner"}.get(tuple(kinds))
    if family is None:
        raise ArchitectureError(
            f"conditioner embedders ({', '.join(kinds) or 'none'}) are neither SDXL base's (CLIP ViT-L in "
            f"{SDXL_CLIP_PREFIX.format(0)}*, OpenCLIP bigG in {SDXL_OPENCLIP_PREFIX.format(1)}*) nor the refiner's "
            f"(OpenCLIP bigG in {SDXL_OPENCLIP_PREFIX.format(0)}*)"
        )
    encoders = []
    for i, (kind, prefix) in enumerate(layouts):
        part = f"SDXL text encoder {i} ({prefix}*)"
        read = _clip_config if kind == "clip" else _openclip_config
        encoders.append(read(_sub(sd, prefix), part, sdxl=True))
    return family, encoders


def _reject_unknown(sd: dict[str, Tensor]) -> None:
    """Raise a clear ArchitectureError unless the keys hold a whole SD1/SD2/SDXL model in the original layout."""
    for prefix, message in _UNSUPPORTED:
        if any(k.startswith(prefix) for k in sd):
            raise ArchitectureError(message)
    text_prefixes = (*TEXT_PREFIXES.values(), CONDITIONER)
    have = {
        "UNet": any(k.startswith(UNET_PREFIX) for k in sd),
        "VAE": any(k.startswith(VAE_PREFIX) for k in sd),
        "text encoder": any(k.startswith(p) for k in sd for p in text_prefixes),
    }
    if all(have.values()):
        return
    expected = (f"{UNET_PREFIX}*, {VAE_PREFIX}* and {TEXT_PREFIXES['sd1']}* (SD1), {TEXT_PREFIXES['sd2']}* (SD2) "
                f"or {CONDITIONER}* (SDXL)")
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
    """Build the ModelConfig an original-layout state dict describes (SD1 / SD2 / SDXL base or refiner,
    inpainting or not).

    `prediction_type` ("epsilon" or "v_prediction") overrides the guess, which keys cannot settle:
    v_prediction where the file has the `v_pred` marker, else epsilon for SD1 and SDXL, v_prediction for SD2
    (wrong for the 512px SD2 base models). The returned config's `prediction_type` says which one was used.
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InvalidInputError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    sd = {canonical_key(k): v for k, v in sd.items()}
    _reject_unknown(sd)
    if any(k.startswith(CONDITIONER) for k in sd):
        family, encoders = _sdxl_text_encoders(sd)
    elif any(k.startswith(TEXT_PREFIXES["sd1"]) for k in sd):
        family, encoders = "sd1", [_clip_config(_sub(sd, TEXT_PREFIXES["sd1"]))]
    else:
        family, encoders = "sd2", [_openclip_config(_sub(sd, TEXT_PREFIXES["sd2"]))]
    unet = unet_config_from_tensors(_sub(sd, UNET_PREFIX))
    width = sum(e.width for e in encoders)
    if unet.context_dim != width:
        widths = " + ".join(str(e.width) for e in encoders)
        raise ArchitectureError(
            f"UNet cross-attention expects {unet.context_dim}-wide text context but the {family} text "
            f"encoder{'s are' if len(encoders) > 1 else ' is'} {widths} wide: the parts do not belong together"
        )
    vae = _vae_config(_sub(sd, VAE_PREFIX))
    if family.startswith("sdxl"):
        unet = _sdxl_addition(unet, family, encoders[-1].projection_dim)
        vae = dataclasses.replace(vae, scaling_factor=SDXL_VAE.scaling_factor)
    elif unet.has_addition:
        raise ArchitectureError(f"the UNet has SDXL's addition embedding ({UNET_PREFIX}label_emb.*) but the text "
                                f"encoder is {family}'s ({TEXT_PREFIXES[family]}*): the parts do not belong together")
    if prediction_type is None and V_PRED_KEY in sd:
        prediction_type = "v_prediction"
    prediction_type = prediction_type or ("v_prediction" if family == "sd2" else "epsilon")
    if family == "sd2" and prediction_type == "v_prediction":
        unet = dataclasses.replace(unet, sample_size=96)  # SD2's v-models are the 768 px ones
    return ModelConfig(
        family=family,
        prediction_type=prediction_type,
        unet=unet,
        vae=vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1] if len(encoders) > 1 else None,
    )


def _sdxl_addition(unet: UNetConfig, family: str, pooled: int) -> UNetConfig:
    """The UNet's addition embedding split into the pooled text embedding and the size/crop numbers' sinusoids."""
    if not unet.has_addition:
        raise ArchitectureError(f"an {family} checkpoint's UNet needs the addition embedding of the pooled text "
                                f"embedding and size numbers ({UNET_PREFIX}label_emb.0.0.weight); this one has none")
    numbers = SDXL_TIME_IDS[family]
    each, rest = divmod(unet.addition_in_dim - pooled, numbers)
    if each < 1 or rest:
        raise ArchitectureError(
            f"UNet: label_emb.0.0.weight takes {unet.addition_in_dim} inputs, which is not the {pooled}-wide pooled "
            f"text embedding plus {numbers} equal embeddings of the size numbers an {family} model takes"
        )
    return dataclasses.replace(unet, addition_time_embed_dim=each)
