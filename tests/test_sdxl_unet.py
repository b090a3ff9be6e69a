"""SDXL's UNet (base and refiner shapes) against diffusers' UNet2DConditionModel with identical (random) weights:
levels without attention, per-level transformer depth, the text_time addition embedding, the original layout."""

import dataclasses

import pytest
import torch
from conftest import assert_parity
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from sdtorch.checkpoints.keymaps import UNET_PREFIX, original_to_parts, parts_to_original
from sdtorch.configs import SDXL_REFINER_UNET, SDXL_UNET, TINY_SD1, ModelConfig, TextEncoderConfig, UNetConfig
from sdtorch.errors import ArchitectureError, InvalidInputError
from sdtorch.models.unet import UNet
from sdtorch.tomlconfig import from_table

pytestmark = pytest.mark.usefixtures("one_thread")

POOLED = 16  # the pooled text embedding's width (SDXL: 1280)
# SDXL base in small: no attention on level 0, transformer depth 1 and 2 (the mid block's 2), 6 time ids
TINY_XL = UNetConfig(
    block_channels=(32, 64, 64), attention_levels=(False, True, True), layers_per_block=2, num_heads=(2, 4, 4),
    context_dim=32, use_linear_proj=True, transformer_depth=(0, 1, 2), addition_time_embed_dim=8,
    addition_in_dim=POOLED + 6 * 8,
)
# the refiner in small: 4 levels, attention on the middle two, one depth for all, 5 time ids (with aesthetic score)
TINY_REFINER = UNetConfig(
    block_channels=(32, 32, 64, 64), attention_levels=(False, True, True, False), layers_per_block=2,
    num_heads=(2, 2, 4, 4), context_dim=24, use_linear_proj=True, transformer_depth=2, addition_time_embed_dim=8,
    addition_in_dim=POOLED + 5 * 8,
)
CONFIGS = {"base": TINY_XL, "refiner": TINY_REFINER}


def _diffusers_args(cfg: UNetConfig) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}


def reference(cfg: UNetConfig) -> UNet2DConditionModel:
    """A diffusers UNet with random weights, norm affines and biases perturbed away from their init."""
    ref = UNet2DConditionModel(**_diffusers_args(cfg)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return ref


def inputs(cfg: UNetConfig, batch: int = 2, size: tuple[int, int] = (16, 16)):
    """Latents, timesteps, context, pooled text embeddings and time ids (base: 6 numbers, refiner: 5)."""
    x = torch.randn(batch, cfg.in_channels, *size)
    t = torch.tensor([999, 17][:batch])
    context = torch.randn(batch, 11, cfg.context_dim)
    pooled = torch.randn(batch, POOLED)
    n = (cfg.addition_in_dim - POOLED) // cfg.addition_time_embed_dim
    numbers = {6: [[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]],  # sizes, crop, target
               5: [[1024, 1024, 0, 0, 6.0], [512, 768, 16, 0, 2.5]]}[n]  # sizes, crop, aesthetic score
    return x, t, context, pooled, torch.tensor(numbers[:batch], dtype=torch.float32)


def expected(ref: UNet2DConditionModel, x, t, context, pooled, ids) -> torch.Tensor:
    added = {"text_embeds": pooled, "time_ids": ids}
    return ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_parity_with_diffusers(name):
    cfg = CONFIGS[name]
    ref = reference(cfg)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    args = inputs(cfg, size=(16, 24))
    copies = [a.clone() for a in args]
    x, t, context, pooled, ids = args
    out = ours(x, t, context, text_embeds=pooled, time_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(args, copies)), "inputs were modified"
    assert_parity(out, expected(ref, *args))
    # the addition embedding matters: other size numbers give another output
    assert not torch.allclose(ours(x, t, context, text_embeds=pooled, time_ids=ids + 64), out)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_split_forward_is_the_unet_and_its_shallow_part_on_the_same_features_is_too(name):
    cfg = CONFIGS[name]
    unet = UNet(cfg).eval()
    x, t, context, pooled, ids = inputs(cfg)
    added = dict(text_embeds=pooled, time_ids=ids)
    whole = unet(x, t, context, **added)
    for shallow in range(cfg.layers_per_block + 1):
        out, deep = unet.split_forward(x, t, context, shallow=shallow, **added)
        torch.testing.assert_close(out, whole, rtol=0, atol=0)
        again, _ = unet.split_forward(x, t, context, deep, shallow, **added)
        torch.testing.assert_close(again, whole, rtol=1e-6, atol=1e-6)
        # the shallow part gets the addition embedding too
        other, _ = unet.split_forward(x, t, context, deep, shallow, text_embeds=pooled + 1, time_ids=ids)
        assert not torch.allclose(other, whole)


@torch.no_grad()
def test_original_layout_round_trips_and_matches_diffusers_converter():
    cfg = TINY_XL
    ref = reference(cfg)
    te = TextEncoderConfig(width=16, num_layers=2, num_heads=1, mlp_width=32, projection_dim=16, hidden_state_output=True)
    # the UNet part of a model config; the other parts are absent from the dicts
    model = ModelConfig(family="sdxl", unet=cfg, text_encoder=te, text_encoder_2=dataclasses.replace(te, with_projection=True))
    original = parts_to_original({"unet": ref.state_dict()}, model)
    # the original (SGM) names of SDXL's UNet: 9 input and output blocks, upsamplers after the transformers
    for key in ("label_emb.0.0.weight", "label_emb.0.2.bias", "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
                "middle_block.1.transformer_blocks.1.ff.net.2.weight", "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.0.out_layers.3.weight", "input_blocks.6.0.op.weight"):
        assert UNET_PREFIX + key in original, key
    assert not any(k.startswith(UNET_PREFIX + "input_blocks.1.1.") for k in original)  # level 0: no attention
    assert not any(".transformer_blocks.1." in k for k in original if "input_blocks.4." in k)  # level 1: depth 1
    converted = convert_ldm_unet_checkpoint(original, cfg.to_diffusers())
    assert converted.keys() == ref.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in ref.state_dict().items())

    parts, ignored = original_to_parts(original, model)
    assert ignored == [] and parts["vae"] == {} and parts["text_encoder"] == {}
    ours = UNet(cfg).eval()
    ours.load_state_dict(parts["unet"], strict=True)
    x, t, context, pooled, ids = args = inputs(cfg)
    assert_parity(ours(x, t, context, text_embeds=pooled, time_ids=ids), expected(ref, *args))


@torch.no_grad()
def test_missing_or_unexpected_addition_conditioning_is_a_clear_error():
    unet = UNet(TINY_XL)
    x, t, context, pooled, ids = inputs(TINY_XL)
    for added in ({}, {"text_embeds": pooled}, {"time_ids": ids}):
        with pytest.raises(InvalidInputError, match="needs text_embeds"):
            unet(x, t, context, **added)
    for bad in ({"text_embeds": pooled, "time_ids": ids[:, :5]}, {"text_embeds": pooled[:1], "time_ids": ids},
                {"text_embeds": pooled[:, None], "time_ids": ids}):
        with pytest.raises(InvalidInputError, match="got shapes"):
            unet(x, t, context, **bad)
    with pytest.raises(InvalidInputError, match="needs text_embeds"):
        unet.split_forward(x, t, context)
    sd1 = UNet(TINY_SD1.unet)
    with pytest.raises(InvalidInputError, match="takes no text_embeds"):
        sd1(x, t, torch.randn(2, 7, TINY_SD1.unet.context_dim), text_embeds=pooled, time_ids=ids)


@pytest.mark.parametrize("cfg", [SDXL_UNET, SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_full_size_keys_and_shapes_match_diffusers(cfg):
    with torch.device("meta"):
        ref = {k: v.shape for k, v in UNet2DConditionModel(**_diffusers_args(cfg)).state_dict().items()}
        ours = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    assert ours == ref
    assert ref["add_embedding.linear_1.weight"] == (4 * cfg.block_channels[0], cfg.addition_in_dim)


def test_diffusers_configs_of_sdxl_read_back():
    # as the hub's stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 unet/config.json state them
    base = dict(_diffusers_args(SDXL_UNET), transformer_layers_per_block=[1, 2, 10], addition_embed_type_num_heads=64)
    refiner = dict(_diffusers_args(SDXL_REFINER_UNET), attention_head_dim=[6, 12, 24, 24])
    assert base["projection_class_embeddings_input_dim"] == 2816 and base["addition_time_embed_dim"] == 256
    assert refiner["projection_class_embeddings_input_dim"] == 2560 and refiner["transformer_layers_per_block"] == 4
    assert UNetConfig.from_diffusers(base) == SDXL_UNET
    assert UNetConfig.from_diffusers(refiner) == SDXL_REFINER_UNET
    for cfg in (TINY_XL, TINY_REFINER, TINY_SD1.unet):
        assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert "addition_embed_type" not in TINY_SD1.unet.to_diffusers()
    with pytest.raises(ArchitectureError, match="addition_embed_type 'image'"):
        UNetConfig.from_diffusers(dict(base, addition_embed_type="image"))
    with pytest.raises(ArchitectureError, match="projection_class_embeddings_input_dim"):
        UNetConfig.from_diffusers({k: v for k, v in base.items() if k != "projection_class_embeddings_input_dim"})


def test_model_config_tables_take_per_level_depth():
    """A per-level transformer_depth is a TOML array, one count an int; both read back from to_dict."""
    for cfg in (TINY_XL, TINY_SD1.unet):
        table = dataclasses.asdict(cfg)
        assert from_table(UNetConfig, table, source="t.toml") == cfg
    with pytest.raises(InvalidInputError, match="int or a list of int"):
        from_table(UNetConfig, dict(dataclasses.asdict(TINY_XL), transformer_depth="2"), source="t.toml")


@pytest.mark.parametrize("changes, message", [
    (dict(transformer_depth=(1, 2)), "one entry per level"),
    (dict(transformer_depth=(1, 1, 2)), "level 0 has no attention"),
    (dict(transformer_depth=(0, 0, 2)), "level 1 must be between 1"),
    (dict(transformer_depth=(0, 1, 0)), "level 2 \\(and the mid block's\\)"),
    (dict(addition_in_dim=0), "both 0"),
])
def test_bad_configs_are_architecture_errors(changes, message):
    with pytest.raises(ArchitectureError, match=message):
        dataclasses.replace(TINY_XL, **changes)
