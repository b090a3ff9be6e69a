"""Original single-file layout <-> sdtorch names, checked against diffusers' own converters, and
architecture detection from the keys."""

import dataclasses
import functools

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sdtorch.checkpoints.detect import infer_config
from sdtorch.checkpoints.keymaps import original_to_parts, parts_to_original
from sdtorch.configs import SD1, SD2, TINY_SD1, TINY_SD2, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdtorch.errors import ArchitectureError, InvalidInputError

# 3 levels, 2 ResBlocks a level, attention on the outer levels only (so output blocks hold their
# upsampler at index 2 on one level and 1 on the other), 2 transformer blocks per SpatialTransformer.
VARIED_SD1 = ModelConfig(
    unet=UNetConfig(
        block_channels=(32, 64, 96), attention_levels=(True, False, True), layers_per_block=2,
        num_heads=(8, 8, 8), context_dim=128, transformer_depth=2,
    ),
    vae=VAEConfig(block_channels=(32, 32, 64), layers_per_block=2),
    text_encoder=TextEncoderConfig(width=128, num_layers=3, num_heads=2, mlp_width=256, projection_dim=128),
)
VARIED_SD2 = VARIED_SD1.replace(
    family="sd2",
    prediction_type="v_prediction",
    unet=dataclasses.replace(
        VARIED_SD1.unet, block_channels=(64, 128, 128), attention_levels=(False, True, True), num_heads=(1, 2, 2),
        use_linear_proj=True, in_channels=9, sample_size=96,
    ),
    text_encoder=dataclasses.replace(VARIED_SD1.text_encoder, activation="gelu", pad_token_id=0),
)
INPAINT_SD1 = TINY_SD1.replace(unet=dataclasses.replace(TINY_SD1.unet, in_channels=9))
CONFIGS = {"tiny-sd1": TINY_SD1, "tiny-sd2": TINY_SD2, "inpaint-sd1": INPAINT_SD1, "varied-sd1": VARIED_SD1,
           "varied-sd2": VARIED_SD2}

SD2_TEXT = "cond_stage_model.model."
# Tensors real single files carry besides the model; original_to_parts must skip and report them.
EXTRAS = {
    "betas": (1000,), "alphas_cumprod": (1000,), "alphas_cumprod_prev": (1000,), "sqrt_alphas_cumprod": (1000,),
    "sqrt_one_minus_alphas_cumprod": (1000,), "log_one_minus_alphas_cumprod": (1000,),
    "sqrt_recip_alphas_cumprod": (1000,), "posterior_variance": (1000,), "posterior_mean_coef1": (1000,),
    "model_ema.decay": (), "model_ema.diffusion_modelinput_blocks00weight": (32, 4, 3, 3),
}


def _diffusers_args(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k != "_class_name"}


@functools.cache
def reference(name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Random-weight diffusers / transformers models of a config, as sdtorch-named state dicts."""
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    unet = UNet2DConditionModel(**_diffusers_args(cfg.unet.to_diffusers()))
    vae = AutoencoderKL(**_diffusers_args(cfg.vae.to_diffusers()))
    text = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder.to_diffusers()))
    return {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()}


def full_file(name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An original single file as released: the model plus the tensors sdtorch skips (and their names)."""
    cfg = CONFIGS[name]
    sd = parts_to_original(reference(name), cfg)
    extras = {k: torch.randn(shape) for k, shape in EXTRAS.items()}
    if cfg.family == "sd1":
        extras["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        # OpenCLIP's last block (SD2 conditions on the penultimate), projection, logit scale, a vision tower key
        width, last = cfg.text_encoder.width, cfg.text_encoder.num_layers
        block = {k: v for k, v in sd.items() if k.startswith(f"{SD2_TEXT}transformer.resblocks.0.")}
        for k, v in block.items():
            extras[k.replace("resblocks.0.", f"resblocks.{last}.")] = torch.randn_like(v)
        extras[SD2_TEXT + "text_projection"] = torch.randn(width, cfg.text_encoder.projection_dim)
        extras[SD2_TEXT + "logit_scale"] = torch.tensor(4.6)
        extras[SD2_TEXT + "visual.conv1.weight"] = torch.randn(8, 3, 2, 2)
    return {**sd, **extras}, list(extras)


def assert_same(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(expected)
    different = [k for k in expected if not torch.equal(ours[k], expected[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_converters_read_our_original_layout_back(name):
    """parts_to_original must write exactly what diffusers' single-file converters take apart again."""
    cfg, parts = CONFIGS[name], reference(name)
    sd, _ = full_file(name)
    original = parts_to_original(parts, cfg)
    assert_same(convert_ldm_unet_checkpoint(original, cfg.unet.to_diffusers()), parts["unet"])
    assert_same(convert_ldm_vae_checkpoint(original, cfg.vae.to_diffusers()), parts["vae"])
    if cfg.family == "sd1":
        text = convert_ldm_clip_checkpoint(original)
    else:
        model = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder.to_diffusers()))
        text = convert_open_clip_checkpoint(model, sd)  # the full file: diffusers splits q/k/v by text_projection
        # diffusers drops only block 23 (ViT-H's last) by name: drop the tiny model's last block and projection
        last = f"text_model.encoder.layers.{cfg.text_encoder.num_layers}."
        text = {k: v for k, v in text.items() if not k.startswith(last) and k != "text_projection.weight"}
    assert_same({k.removeprefix("text_model."): v for k, v in text.items()}, parts["text_encoder"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_to_parts_inverts_parts_to_original_and_reports_skipped(name):
    cfg, parts = CONFIGS[name], reference(name)
    sd, extra_keys = full_file(name)
    back, ignored = original_to_parts(sd, cfg)
    for part in parts:
        assert_same(back[part], parts[part])
    assert sorted(ignored) == sorted(extra_keys)
    assert_same(parts_to_original(back, cfg), parts_to_original(parts, cfg))


# Names and shapes in the released SD files (v1-5-pruned, 768-v-ema), one anchor per rule.
SD1_ANCHORS = {
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
}
SD2_ANCHORS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 1024),
    "cond_stage_model.model.token_embedding.weight": (49408, 1024),
    "cond_stage_model.model.positional_embedding": (77, 1024),
    "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
    "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
    "cond_stage_model.model.ln_final.weight": (1024,),
}


@pytest.mark.parametrize("cfg, anchors", [(SD1, SD1_ANCHORS), (SD2, SD2_ANCHORS)], ids=["sd1", "sd2"])
def test_full_size_layout_on_meta_device(cfg, anchors):
    """Full-size SD1/SD2 (meta tensors: names and shapes only): anchors of the released files, diffusers'
    converters agree on every name and shape, and the presets are read back from the keys."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_diffusers_args(cfg.unet.to_diffusers()))
        vae = AutoencoderKL(**_diffusers_args(cfg.vae.to_diffusers()))
        text = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder.to_diffusers()))
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()}
    sd = parts_to_original(parts, cfg)
    assert {k: tuple(sd[k].shape) for k in anchors} == anchors

    def shapes(d):
        return {k: tuple(v.shape) for k, v in d.items()}

    assert shapes(convert_ldm_unet_checkpoint(sd, cfg.unet.to_diffusers())) == shapes(parts["unet"])
    assert shapes(convert_ldm_vae_checkpoint(sd, cfg.vae.to_diffusers())) == shapes(parts["vae"])
    if cfg.family == "sd2":  # OpenCLIP ViT-H has a 24th block that SD2 does not use
        sd.update({k.replace(".resblocks.0.", ".resblocks.23."): v for k, v in sd.items() if ".resblocks.0." in k})
    assert infer_config(sd) == cfg
    back, ignored = original_to_parts(sd, cfg)
    assert {p: shapes(d) for p, d in back.items()} == {p: shapes(d) for p, d in parts.items()}
    assert len(ignored) == (12 if cfg.family == "sd2" else 0)


def test_vae_attention_is_conv_in_original_and_linear_in_sdtorch():
    sd = parts_to_original(reference("tiny-sd1"), TINY_SD1)
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert sd["first_stage_model.encoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    text = parts_to_original(reference("tiny-sd2"), TINY_SD2)
    assert text[SD2_TEXT + "transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 128, 128)
    assert not any(".resblocks.2." in k for k in text)  # only the kept blocks are written


def test_legacy_sd1_text_encoder_keys_without_text_model_prefix():
    sd = parts_to_original(reference("tiny-sd1"), TINY_SD1)
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sd.items()}
    assert infer_config(old) == TINY_SD1
    back, _ = original_to_parts(old, TINY_SD1)
    assert_same(back["text_encoder"], reference("tiny-sd1")["text_encoder"])


def test_unexpected_keys_are_named():
    sd, _ = full_file("tiny-sd1")
    sd["model.diffusion_model.input_blocks.7.0.in_layers.0.weight"] = torch.ones(3)  # a block TINY_SD1 lacks
    sd["somebody.elses.tensor"] = torch.ones(3)
    with pytest.raises(ArchitectureError, match=r"2 tensor.*a sd1 model.*somebody\.elses\.tensor.*input_blocks\.7\.0"):
        original_to_parts(sd, TINY_SD1)
    with pytest.raises(ArchitectureError, match="no name in the original layout: unet: foo.weight"):
        parts_to_original({"unet": {"foo.weight": torch.ones(1)}}, TINY_SD1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_infer_config_reads_the_architecture_from_shapes(name):
    sd, _ = full_file(name)
    assert infer_config(sd) == CONFIGS[name]


def test_infer_config_prediction_type_override():
    sd, _ = full_file("tiny-sd2")
    assert infer_config(sd).prediction_type == "v_prediction"
    eps_unet = dataclasses.replace(TINY_SD2.unet, sample_size=64)  # SD2's epsilon models are the 512 px ones
    assert infer_config(sd, "epsilon") == TINY_SD2.replace(prediction_type="epsilon", unet=eps_unet)
    sd1, _ = full_file("tiny-sd1")
    assert infer_config(sd1, "v_prediction").prediction_type == "v_prediction"
    with pytest.raises(InvalidInputError, match="prediction_type"):
        infer_config(sd, "eps")


def test_infer_config_rejects_what_it_cannot_load():
    sd, _ = full_file("tiny-sd1")
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.ones(2, 2),
        "model.diffusion_model.label_emb.0.0.weight": torch.ones(2, 2),
        **{k: v for k, v in sd.items() if k.startswith("model.")},
    }
    with pytest.raises(ArchitectureError, match=r"only part of a model.*no VAE"):
        infer_config(sdxl)
    with pytest.raises(ArchitectureError, match=r"model\.diffusion_model\.\*"):
        infer_config({"foo.weight": torch.ones(1), "bar.baz.bias": torch.ones(1)})
    with pytest.raises(ArchitectureError, match=r"foo \(1 keys\), bar \(1 keys\)"):
        infer_config({"foo.weight": torch.ones(1), "bar.baz.bias": torch.ones(1)})
    unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(ArchitectureError, match="only part of a model.*UNet; no VAE, text encoder"):
        infer_config(unet_only)
    bare_unet = {k.removeprefix("model.diffusion_model."): v for k, v in unet_only.items()}
    with pytest.raises(ArchitectureError, match="bare UNet in the original layout"):
        infer_config(bare_unet)
    with pytest.raises(ArchitectureError, match="bare VAE in the diffusers layout"):
        infer_config(reference("tiny-sd1")["vae"])
    mixed = {**sd, "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": torch.ones(64, 96)}
    with pytest.raises(ArchitectureError, match="do not belong together"):
        infer_config(mixed)
