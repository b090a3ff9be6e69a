"""T2I-Adapter against diffusers' T2IAdapter with identical (random) weights: its features for the full, SDXL and
light layouts, the UNet that adds them inside its down path (against diffusers' UNet2DConditionModel's
`down_intrablock_additional_residuals`, with and without ControlNet residuals, and through step caching),
TencentARC's original file layout (written here by reversing diffusers' conversion script), diffusers folders and
single files, and the loader's errors."""

import argparse
import dataclasses
import json
import re

import pytest
import torch
from conftest import assert_parity
from diffusers import T2IAdapter as DiffusersT2IAdapter
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sdtorch.checkpoints.t2i_adapter_files import (
    check_fits,
    infer_t2i_adapter_config,
    load_t2i_adapter,
    original_to_t2i_adapter,
    t2i_adapter_to_original,
)
from sdtorch.configs import UNetConfig
from sdtorch.errors import ArchitectureError, CheckpointError, InvalidInputError, MissingKeysError
from sdtorch.models.t2i_adapter import (
    T2I_ADAPTER_LIGHT,
    T2I_ADAPTER_SD1,
    T2I_ADAPTER_SDXL,
    T2IAdapter,
    T2IAdapterConfig,
)
from sdtorch.models.unet import UNet, intrablock_points

pytestmark = pytest.mark.usefixtures("one_thread")

POOLED = 16  # the pooled text embedding's width (SDXL: 1280)
# SD1 in small: three levels of two stages, attention on the first two (tests/test_controlnet.py's)
SD1_UNET = UNetConfig(block_channels=(32, 64, 64), attention_levels=(True, True, False), layers_per_block=2,
                      num_heads=(8, 8, 8), context_dim=48)
# SDXL base in small: no attention on level 0, transformer depth 1 and 2, 6 time ids
XL_UNET = UNetConfig(block_channels=(32, 64, 64), attention_levels=(False, True, True), layers_per_block=2,
                     num_heads=(2, 4, 4), context_dim=32, use_linear_proj=True, transformer_depth=(0, 1, 2),
                     addition_time_embed_dim=8, addition_in_dim=POOLED + 6 * 8)
# adapters for them: a feature for each down level (at 1/8, 1/16, 1/32 of the image for SD1's); SDXL's also one
# for the mid block; the light one has one level more than `channels` names
ADAPTERS = {
    "full": (T2IAdapterConfig(channels=(32, 64, 64)), SD1_UNET),
    "full_xl": (T2IAdapterConfig(channels=(32, 64, 64, 64), downscale_factor=16, adapter_type="full_adapter_xl"),
                XL_UNET),
    "light": (T2IAdapterConfig(channels=(32, 64), num_res_blocks=3, adapter_type="light_adapter"), SD1_UNET),
}


def _diffusers_args(cfg) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Norm affines and biases moved away from their init (so each matters)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or not p.any():
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def reference(cfg: T2IAdapterConfig) -> DiffusersT2IAdapter:
    return _perturb(DiffusersT2IAdapter(**_diffusers_args(cfg)))


def ours_from(ref: DiffusersT2IAdapter, cfg: T2IAdapterConfig) -> T2IAdapter:
    model = T2IAdapter(cfg).eval()
    model.load_state_dict({k.removeprefix("adapter."): v for k, v in ref.state_dict().items()}, strict=True)
    return model


def image_for(cfg: T2IAdapterConfig, latent_size=(8, 12), batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, cfg.in_channels, 8 * latent_size[0], 8 * latent_size[1])


def odd_size(cfg: T2IAdapterConfig) -> tuple[int, int]:
    """Latent sizes that halve to odd ones (the image must stay a multiple of the pixel unshuffle's factor)."""
    return (5, 7) if cfg.downscale_factor == 8 else (6, 10)


def to_original(ref_state: dict, cfg: T2IAdapterConfig) -> dict:
    """diffusers' scripts/convert_original_t2i_adapter.py in reverse, written out here independently of sdtorch's
    tables: full: adapter.body.{i}.resnets.{j} -> body.{i * n + j}, adapter.body.{i}.in_conv -> body.{i * n}.in_conv;
    light: adapter.body.{i}.resnets.{j} -> body.{i}.body.{j}; everything else loses `adapter.`."""
    n, out = cfg.num_res_blocks, {}
    for key, tensor in ref_state.items():
        key = key.removeprefix("adapter.")
        if cfg.adapter_type == "light_adapter":
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", key)
        else:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", lambda m: f"body.{int(m[1]) * n + int(m[2])}.", key)
            key = re.sub(r"^body\.(\d+)\.in_conv\.", lambda m: f"body.{int(m[1]) * n}.in_conv.", key)
        out[key] = tensor.clone()
    return out


@pytest.mark.parametrize("name", list(ADAPTERS))
@torch.no_grad()
def test_features_equal_diffusers(name):
    cfg, _ = ADAPTERS[name]
    ref = reference(cfg)
    ours = ours_from(ref, cfg)
    assert ours.total_downscale_factor == ref.total_downscale_factor
    assert ours.downscale_factor == ref.downscale_factor
    for latent in ((8, 12), odd_size(cfg)):  # odd sizes: each halving rounds up (ceil-mode pooling), as in diffusers
        image = image_for(cfg, latent)
        copy = image.clone()
        features, theirs = ours(image), ref(image)
        assert len(features) == len(theirs) == len(cfg.levels)
        for a, b in zip(features, theirs):
            assert_parity(a, b)
        assert torch.equal(image, copy), "the image was modified"
        for a, b in zip(ours(image, scale=0.4), features):  # diffusers' adapter_conditioning_scale
            torch.testing.assert_close(a, 0.4 * b)
    widths = [f.shape[1] for f in features]
    assert widths == [cout for _, cout, _ in cfg.levels]
    want = {"full": [(8, 12), (4, 6), (2, 3)], "full_xl": [(4, 6), (4, 6), (2, 3), (2, 3)],
            "light": [(8, 12), (4, 6), (2, 3)]}[name]
    assert [tuple(f.shape[2:]) for f in ours(image_for(cfg))] == want


@pytest.mark.parametrize("name", ["full", "full_xl"])
@torch.no_grad()
def test_unet_with_adapter_features_equals_diffusers(name):
    cfg, unet_cfg = ADAPTERS[name]
    check_fits(cfg, unet_cfg)
    adapter = reference(cfg)
    ref_unet = _perturb(UNet2DConditionModel(**_diffusers_args(unet_cfg)))
    unet = UNet(unet_cfg).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    for latent in ((8, 12), odd_size(cfg)):
        x = torch.randn(2, 4, *latent)
        t = torch.tensor([999, 17])
        context = torch.randn(2, 7, unet_cfg.context_dim)
        added = {}
        if unet_cfg.has_addition:
            added = {"text_embeds": torch.randn(2, POOLED),
                     "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]],
                                              dtype=torch.float32)}
        features = [0.8 * f for f in adapter(image_for(cfg, latent))]
        copies = [f.clone() for f in features]
        # diffusers pops the features from the list it is given (and adds some in place): it gets its own copies
        theirs = ref_unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added or None,
                          down_intrablock_additional_residuals=[f.clone() for f in features]).sample
        out = unet(x, t, context, **added, down_intrablock_additional_residuals=features)
        assert_parity(out, theirs)
        assert all(torch.equal(a, b) for a, b in zip(features, copies)), "the features were modified"
        assert not torch.allclose(out, unet(x, t, context, **added), atol=1e-3)  # they matter
        if name == "full_xl":  # the last feature goes to the mid block's output; it matters too
            assert not torch.allclose(out, unet(x, t, context, **added,
                                                down_intrablock_additional_residuals=features[:-1]), atol=1e-4)

        # with a ControlNet's residuals too: added to skips that already carry the adapter's features
        down = [0.3 * torch.randn_like(s) for s in _skips(unet, x, t, context, added)]
        mid = 0.3 * torch.randn(2, unet_cfg.block_channels[-1], *down[-1].shape[2:])
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        theirs = ref_unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added or None,
                          down_intrablock_additional_residuals=[f.clone() for f in features], **residuals).sample
        both = dict(down_intrablock_additional_residuals=features, **residuals)
        out = unet(x, t, context, **added, **both)
        assert_parity(out, theirs)

        # step caching: the shallow part on kept deep features gives the whole UNet's output
        for shallow in range(unet_cfg.layers_per_block + 1):
            whole, deep = unet.split_forward(x, t, context, shallow=shallow, **added, **both)
            torch.testing.assert_close(whole, out, rtol=0, atol=0)
            again, _ = unet.split_forward(x, t, context, deep, shallow, **added, **both)
            torch.testing.assert_close(again, out, rtol=1e-6, atol=1e-6)


def _skips(unet: UNet, x, t, context, added) -> list[torch.Tensor]:
    """The UNet's skips for these inputs (their shapes are what a ControlNet's residuals take)."""
    emb = unet.embed(torch.as_tensor(t), **added)
    h = unet.conv_in(x)
    skips = [h]
    for block in unet.down_blocks:
        h = block(h, emb, context, skips)
    return skips


@pytest.mark.parametrize("name, suffix", [("full", ".pth"), ("light", ".pth"), ("full_xl", ".safetensors")])
@torch.no_grad()
def test_original_layout_file_loads_to_the_same_features(tmp_path, name, suffix):
    cfg, unet_cfg = ADAPTERS[name]
    ref = reference(cfg)
    original = to_original(ref.state_dict(), cfg)
    # the layout diffusers' conversion script reads: a flat list of blocks, in_conv in a level's first block
    if name == "full":
        assert {"conv_in.weight", "body.0.block1.weight", "body.1.block2.bias", "body.2.in_conv.weight",
                "body.5.block1.weight"} <= original.keys()
        assert "body.4.in_conv.weight" not in original  # 64 -> 64: no in_conv
    elif name == "light":
        assert {"body.0.in_conv.weight", "body.0.body.2.block2.weight", "body.2.out_conv.bias"} <= original.keys()
    # sdtorch's own tables give the same names (and back)
    ours_original = t2i_adapter_to_original(ref.state_dict(), cfg)
    assert ours_original.keys() == original.keys()
    assert original_to_t2i_adapter(original).keys() == T2IAdapter(cfg).state_dict().keys()

    path = tmp_path / f"t2iadapter_tiny_sd14v1{suffix}"
    if suffix == ".pth":
        torch.save(original, path)  # TencentARC's files: a plain dict of tensors
    else:
        save_file(original, path)
    image = image_for(cfg)
    for base in (None, unet_cfg):
        ours = load_t2i_adapter(path, base=base)
        assert ours.config == cfg and ours.load_report.layout == "original"
        for a, b in zip(ours(image), ref(image), strict=True):
            assert_parity(a, b)


@pytest.mark.parametrize("name", list(ADAPTERS))
@torch.no_grad()
def test_diffusers_folder_and_single_file_load(tmp_path, name):
    cfg, unet_cfg = ADAPTERS[name]
    ref = reference(cfg)
    ref.save_pretrained(tmp_path / "folder")
    save_file(ref.state_dict(), tmp_path / "diffusers_names.safetensors")
    image = image_for(cfg)
    want = ref(image)
    folder = load_t2i_adapter(tmp_path / "folder", base=unet_cfg)
    assert folder.config == cfg and folder.load_report.layout == "diffusers"
    single = load_t2i_adapter(tmp_path / "diffusers_names.safetensors")
    assert single.config == cfg and single.load_report.layout == "diffusers_single_file"
    for ours in (folder, single):
        assert not ours.training and not any(p.requires_grad for p in ours.parameters())
        for a, b in zip(ours(image), want, strict=True):
            assert_parity(a, b)
    half = load_t2i_adapter(tmp_path / "folder", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half(image)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("cfg", [T2I_ADAPTER_SD1, T2I_ADAPTER_LIGHT, T2I_ADAPTER_SDXL,
                                 dataclasses.replace(T2I_ADAPTER_SD1, in_channels=1),
                                 dataclasses.replace(T2I_ADAPTER_SDXL, in_channels=1)],
                         ids=["sd1", "light", "sdxl", "sd1_sketch", "sdxl_canny"])
def test_full_size_keys_shapes_and_architecture(cfg):
    with torch.device("meta"):
        ref = DiffusersT2IAdapter(**_diffusers_args(cfg))
        theirs = {k.removeprefix("adapter."): v.shape for k, v in ref.state_dict().items()}
        model = T2IAdapter(cfg)
    assert {k: v.shape for k, v in model.state_dict().items()} == theirs
    assert model.total_downscale_factor == ref.total_downscale_factor
    # the architecture reads back from the tensors, in diffusers' names and in the original layout
    state = model.state_dict()
    assert infer_t2i_adapter_config(state) == cfg
    original = t2i_adapter_to_original(state, cfg)
    assert infer_t2i_adapter_config(original_to_t2i_adapter(original)) == cfg
    if cfg.adapter_type == "full_adapter":  # the shapes diffusers' conversion script asserts
        c = cfg.in_channels * 64
        assert original["conv_in.weight"].shape == (320, c, 3, 3)
        assert original["body.0.block1.weight"].shape == (320, 320, 3, 3)
        assert original["body.2.in_conv.weight"].shape == (640, 320, 1, 1)
        assert original["body.4.in_conv.weight"].shape == (1280, 640, 1, 1)
        assert original["body.6.block1.weight"].shape == (1280, 1280, 3, 3)
        assert len({k.split(".")[1] for k in original if k.startswith("body.")}) == 8


def test_full_size_adapters_fit_their_unets():
    from sdtorch.configs import SD1, SD2, SDXL_UNET

    assert intrablock_points(SD1.unet) == [(320, 1), (640, 2), (1280, 4), (1280, 8), (1280, 8)]
    assert intrablock_points(SDXL_UNET) == [(320, 2), (640, 2), (1280, 4), (1280, 4)]
    check_fits(T2I_ADAPTER_SD1, SD1.unet)
    check_fits(T2I_ADAPTER_LIGHT, SD1.unet)
    check_fits(T2I_ADAPTER_SD1, SD2.unet)
    check_fits(T2I_ADAPTER_SDXL, SDXL_UNET)
    with pytest.raises(ArchitectureError, match="does not fit this model: feature 0 has 320 channels at 1/8"):
        check_fits(T2I_ADAPTER_SD1, SDXL_UNET)
    with pytest.raises(ArchitectureError, match="down level 0 takes 320 at 1/8"):
        check_fits(T2I_ADAPTER_SDXL, SD1.unet)


def test_diffusers_configs_read_back():
    for cfg in (*[c for c, _ in ADAPTERS.values()], T2I_ADAPTER_SD1, T2I_ADAPTER_LIGHT, T2I_ADAPTER_SDXL):
        assert T2IAdapterConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # as the hub's TencentARC/t2i-adapter-canny-sdxl-1.0 config.json states it
    hub = {"_class_name": "T2IAdapter", "_diffusers_version": "0.20.0", "adapter_type": "full_adapter_xl",
           "channels": [320, 640, 1280, 1280], "downscale_factor": 16, "in_channels": 1, "num_res_blocks": 2}
    assert T2IAdapterConfig.from_diffusers({k: v for k, v in hub.items() if not k.startswith("_")}) == \
        dataclasses.replace(T2I_ADAPTER_SDXL, in_channels=1)
    assert T2IAdapterConfig.from_diffusers({}) == T2I_ADAPTER_SD1  # diffusers' defaults
    with pytest.raises(ArchitectureError, match="adapter_type 'coadapter'"):
        T2IAdapterConfig(adapter_type="coadapter")
    with pytest.raises(ArchitectureError, match="not multiples of 4"):
        T2IAdapterConfig(channels=(30, 64), adapter_type="light_adapter")


@torch.no_grad()
def test_a_file_is_read_as_the_adapter_that_fits_its_base(tmp_path):
    # conv_in's 256 inputs: SDXL's grey-scale adapter (1 x 16 x 16), or an SD1 adapter of 4-channel images (4 x 8 x 8)
    xl = dataclasses.replace(ADAPTERS["full_xl"][0], in_channels=1)
    save_file(T2IAdapter(xl).state_dict(), tmp_path / "adapter.safetensors")
    assert load_t2i_adapter(tmp_path / "adapter.safetensors").config == xl
    sd1 = UNetConfig(block_channels=(32, 64, 64, 64), attention_levels=(True, True, True, False),
                     layers_per_block=2, num_heads=(8, 8, 8, 8), context_dim=48)
    read = load_t2i_adapter(tmp_path / "adapter.safetensors", base=sd1).config
    assert read == dataclasses.replace(xl, in_channels=4, downscale_factor=8, adapter_type="full_adapter")


@torch.no_grad()
def test_bad_inputs_are_clear_errors():
    cfg, unet_cfg = ADAPTERS["full"]
    adapter, unet = T2IAdapter(cfg).eval(), UNet(unet_cfg).eval()
    image = image_for(cfg)
    with pytest.raises(InvalidInputError, match=r"image must be \(B, 3, H, W\) with H and W multiples of 8"):
        adapter(image[..., :60, :])
    with pytest.raises(InvalidInputError, match="image must be"):
        adapter(image[:, :1])
    features = adapter(image)
    x, t, context = torch.randn(2, 4, 8, 12), torch.tensor([1, 2]), torch.randn(2, 7, 48)
    with pytest.raises(InvalidInputError, match="one tensor for each of the UNet's 3 down levels .*; got 2"):
        unet(x, t, context, down_intrablock_additional_residuals=features[:2])
    with pytest.raises(InvalidInputError, match=r"down_intrablock_additional_residuals\[1\] has shape \(2, 64, 2, 3\)"):
        unet(x, t, context, down_intrablock_additional_residuals=[features[0], features[2], features[2]])
    with pytest.raises(InvalidInputError, match=r"down_intrablock_additional_residuals\[3\] has shape .* mid block"):
        unet(x, t, context, down_intrablock_additional_residuals=[*features, features[0]])
    # one feature set for a batch broadcasts, as the image repeated does
    one = unet(x, t, context, down_intrablock_additional_residuals=adapter(image[:1]))
    many = unet(x, t, context, down_intrablock_additional_residuals=adapter(image[:1].expand_as(image)))
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)


def test_loader_errors(tmp_path):
    cfg, unet_cfg = ADAPTERS["full"]
    state = T2IAdapter(cfg).state_dict()
    original = t2i_adapter_to_original(state, cfg)
    with pytest.raises(CheckpointError, match="no such T2I-Adapter file or folder"):
        load_t2i_adapter(tmp_path / "missing.pth")
    with pytest.raises(InvalidInputError, match="dtype must be a floating-point"):
        load_t2i_adapter(tmp_path / "missing.pth", dtype=torch.int8)
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    for name in ("corrupt.pth", "corrupt.safetensors"):
        with pytest.raises(CheckpointError):
            load_t2i_adapter(tmp_path / name)
    # a pickle that asks for more than tensors is refused, never run
    torch.save({**original, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_t2i_adapter(tmp_path / "pickled.pth")

    cases = {
        "controlnet.safetensors": ({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
                                   "a ControlNet; load it with load_controlnet"),
        "sd.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
                           "Stable Diffusion checkpoint, not a T2I-Adapter"),
        "style.safetensors": ({"style_embedding": torch.zeros(1, 8, 1024)}, "a style adapter"),
        "other.safetensors": ({"foo.weight": torch.zeros(1)}, "holds no T2I-Adapter"),
        "skep.safetensors": ({**original, "body.0.skep.weight": torch.zeros(32, 32, 1, 1)}, "sk=False"),
        "extra.safetensors": ({**original, "head.weight": torch.zeros(1)},
                              "1 tensor.s. fit no part of a T2I-Adapter: head.weight"),
        "gap.safetensors": ({**original, "body.9.block1.weight": torch.zeros(1)},
                            r"body.N blocks are numbered \[0, 1, 2, 3, 4, 5, 9\], not 0, 1, 2"),
        "short.safetensors": ({k: v for k, v in original.items() if k != "body.3.block2.bias"},
                              "missing 1 tensor"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(ArchitectureError, match=message):
            load_t2i_adapter(tmp_path / name)
    with pytest.raises(MissingKeysError):
        load_t2i_adapter(tmp_path / "short.safetensors")
    # an SD1 adapter cannot steer SDXL
    save_file(original, tmp_path / "t2iadapter_depth_sd14v1.safetensors")
    with pytest.raises(ArchitectureError, match="does not fit this model"):
        load_t2i_adapter(tmp_path / "t2iadapter_depth_sd14v1.safetensors", base=ADAPTERS["full_xl"][1])

    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_t2i_adapter(folder)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    with pytest.raises(CheckpointError, match="no weights file"):
        load_t2i_adapter(folder)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with pytest.raises(ArchitectureError, match="a ControlNetModel, not a T2IAdapter"):
        load_t2i_adapter(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_t2i_adapter(folder)
