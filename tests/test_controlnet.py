"""ControlNet against diffusers' ControlNetModel with identical (random) weights: its residuals, the UNet that takes
them, the original layout of the A1111 extension's files (against diffusers' own converter), diffusers folders and
single files, and `from_unet` (zero convolutions at zero leave the UNet unchanged)."""

import dataclasses

import pytest
import torch
from conftest import assert_parity
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

from sdtorch.checkpoints.controlnet_files import (
    check_fits,
    controlnet_to_original,
    infer_controlnet_config,
    load_controlnet,
    original_to_controlnet,
)
from sdtorch.configs import (
    SD1,
    SDXL_UNET,
    TINY_SD1_CONTROLNET,
    TINY_SDXL_CONTROLNET,
    ControlNetConfig,
    UNetConfig,
)
from sdtorch.errors import ArchitectureError, InvalidInputError
from sdtorch.models.controlnet import ControlNet
from sdtorch.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

POOLED = 16  # the pooled text embedding's width (SDXL: 1280)
HINT = (8, 16, 32, 32)  # four widths: the condition image is 8x the latents, as in every released ControlNet
# SD1 in small: three levels of two stages, attention on the first two, conv projections, 8 heads (SD1's rule)
SD1_SHAPED = ControlNetConfig(
    unet=UNetConfig(block_channels=(32, 64, 64), attention_levels=(True, True, False), layers_per_block=2,
                    num_heads=(8, 8, 8), context_dim=48),
    hint_channels=HINT,
)
# SDXL base in small (tests/test_sdxl_unet.py's TINY_XL): no attention on level 0, transformer depth 1 and 2, heads
# of width 16 (not SDXL's 64: the original layout's reader takes them from the base UNet), 6 time ids
XL_SHAPED = ControlNetConfig(
    unet=UNetConfig(block_channels=(32, 64, 64), attention_levels=(False, True, True), layers_per_block=2,
                    num_heads=(2, 4, 4), context_dim=32, use_linear_proj=True, transformer_depth=(0, 1, 2),
                    addition_time_embed_dim=8, addition_in_dim=POOLED + 6 * 8),
    hint_channels=HINT,
)
CONFIGS = {"sd1": SD1_SHAPED, "sdxl": XL_SHAPED}


def _diffusers_args(cfg) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Norm affines, biases and the zero-initialised convs moved away from their init (else residuals are 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or not p.any():
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def reference(cfg: ControlNetConfig) -> ControlNetModel:
    return _perturb(ControlNetModel(**_diffusers_args(cfg)))


def reference_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    return _perturb(UNet2DConditionModel(**_diffusers_args(cfg)))


def inputs(cfg: ControlNetConfig, batch: int = 2, size: tuple[int, int] = (8, 12)):
    """Latents, timesteps, context, the condition image (8x the latents) and SDXL's added conditioning (or {})."""
    x = torch.randn(batch, cfg.unet.in_channels, *size)
    t = torch.tensor([999, 17][:batch])
    context = torch.randn(batch, 7, cfg.unet.context_dim)
    image = torch.rand(batch, cfg.conditioning_channels, 8 * size[0], 8 * size[1])
    added = {}
    if cfg.unet.has_addition:
        ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]][:batch],
                           dtype=torch.float32)
        added = {"text_embeds": torch.randn(batch, POOLED), "time_ids": ids}
    return x, t, context, image, added


def expected(ref: ControlNetModel, x, t, context, image, added, scale=1.0, guess_mode=False):
    down, mid = ref(x, t, context, image, conditioning_scale=scale, added_cond_kwargs=added or None,
                    guess_mode=guess_mode, return_dict=False)
    return list(down), mid


def assert_residuals(ours, theirs) -> None:
    (down, mid), (ref_down, ref_mid) = ours, theirs
    assert len(down) == len(ref_down)
    for a, b in zip(down, ref_down):
        assert_parity(a, b)
    assert_parity(mid, ref_mid)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_residuals_equal_diffusers(name):
    cfg = CONFIGS[name]
    ref = reference(cfg)
    ours = ControlNet(cfg).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, context, image, added = args = inputs(cfg)
    copies = [a.clone() for a in (x, t, context, image)]
    for scale, guess_mode in ((1.0, False), (0.6, False), (0.8, True)):
        down, mid = out = ours(x, t, context, image, scale, guess_mode=guess_mode, **added)
        assert_residuals(out, expected(ref, *args, scale=scale, guess_mode=guess_mode))
    assert all(torch.equal(a, b) for a, b in zip((x, t, context, image), copies)), "inputs were modified"
    # diffusers' shapes: one residual a skip (conv_in, each stage, each downsampler), then the mid block's
    channels = cfg.unet.block_channels
    assert [r.shape[1] for r in down] == [32, 32, 32, 32, 64, 64, 64, 64, 64]
    assert down[0].shape == (2, channels[0], 8, 12) and down[-1].shape == mid.shape == (2, channels[-1], 2, 3)
    # one condition image for the whole batch is the same as the image repeated
    one = ours(x, t, context, image[:1], 0.6, **added)
    many = ours(x, t, context, image[:1].expand_as(image), 0.6, **added)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)
    # one scale a residual is the same as scaling each by hand
    scales = torch.linspace(0.2, 1.0, ours.num_residuals()).tolist()
    down_1, mid_1 = ours(x, t, context, image, **added)
    down_s, mid_s = ours(x, t, context, image, scales, **added)
    for a, b, s in zip(down_s + [mid_s], down_1 + [mid_1], scales):
        torch.testing.assert_close(a, b * s)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_unet_with_residuals_equals_diffusers(name):
    cfg = CONFIGS[name]
    ref_net, ref_unet = reference(cfg), reference_unet(cfg.unet)
    net, unet = ControlNet(cfg).eval(), UNet(cfg.unet).eval()
    net.load_state_dict(ref_net.state_dict(), strict=True)
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    x, t, context, image, added = args = inputs(cfg)
    down, mid = net(x, t, context, image, 0.9, **added)
    ref_down, ref_mid = expected(ref_net, *args, scale=0.9)
    theirs = ref_unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added or None,
                      down_block_additional_residuals=ref_down, mid_block_additional_residual=ref_mid).sample
    residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    copies = [r.clone() for r in [*down, mid]]
    out = unet(x, t, context, **added, **residuals)
    assert_parity(out, theirs)
    assert all(torch.equal(a, b) for a, b in zip([*down, mid], copies)), "residuals were modified"
    assert not torch.allclose(out, unet(x, t, context, **added), atol=1e-3)  # they matter
    # step caching: the shallow part on kept deep features adds the residuals of its own skips
    for shallow in range(cfg.unet.layers_per_block + 1):
        whole, deep = unet.split_forward(x, t, context, shallow=shallow, **added, **residuals)
        torch.testing.assert_close(whole, out, rtol=0, atol=0)
        again, _ = unet.split_forward(x, t, context, deep, shallow, **added, **residuals)
        torch.testing.assert_close(again, out, rtol=1e-6, atol=1e-6)


def _original_file(ref: ControlNetModel, cfg: ControlNetConfig, path, pth: bool = False) -> dict:
    """Write the reference's weights in the original layout (`control_model.*`); returns those tensors."""
    original = controlnet_to_original(ref.state_dict(), cfg)
    if pth:
        # a whole training checkpoint: the SD model's tensors beside the ControlNet's, nested in a state_dict
        torch.save({"state_dict": {**original, "model.diffusion_model.out.2.bias": torch.zeros(4)}}, path)
    else:
        save_file({k: v.contiguous() for k, v in original.items()}, path)
    return original


@pytest.mark.parametrize("name, suffix", [("sd1", ".safetensors"), ("sd1", ".pth"), ("sdxl", ".safetensors")])
@torch.no_grad()
def test_original_layout_file_equals_its_diffusers_conversion(tmp_path, name, suffix):
    cfg = CONFIGS[name]
    made = reference(cfg)
    path = tmp_path / f"control_v11p_tiny_canny{suffix}"
    original = _original_file(made, cfg, path, pth=suffix == ".pth")
    # the original (cldm) names: conv_in in input_blocks.0, a zero conv a skip, the hint encoder's 8 convs at 0..14
    for key in ("input_blocks.0.0.weight", "input_blocks.4.1.proj_in.weight", "input_blocks.6.0.op.weight",
                "zero_convs.8.0.weight", "middle_block_out.0.bias", "input_hint_block.14.weight",
                "input_hint_block.12.bias", "middle_block.2.out_layers.3.weight", "time_embed.2.weight"):
        assert "control_model." + key in original, key
    assert not any(k.startswith("control_model.zero_convs.9.") for k in original)

    # the independent reference: diffusers' converter of original ControlNet files, into its ControlNetModel
    converted = convert_controlnet_checkpoint(original, _diffusers_args(cfg))
    if cfg.unet.has_addition:  # the converter leaves out SDXL's label_emb (diffusers maps it only in its tables)
        for i, j in ((1, 0), (2, 2)):
            for p in ("weight", "bias"):
                converted[f"add_embedding.linear_{i}.{p}"] = original[f"control_model.label_emb.0.{j}.{p}"]
    ref = ControlNetModel(**_diffusers_args(cfg)).eval()
    ref.load_state_dict(converted, strict=True)

    ours = load_controlnet(path, base=cfg.unet)
    assert ours.load_report.layout == "original"
    assert ours.load_report.ignored_keys == (["model.diffusion_model.out.2.bias"] if suffix == ".pth" else [])
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    args = inputs(cfg)
    assert_residuals(ours(*args[:4], 0.75, **args[4]), expected(ref, *args, scale=0.75))


@torch.no_grad()
def test_architecture_is_read_from_the_tensors():
    for cfg in CONFIGS.values():
        original = controlnet_to_original(ControlNet(cfg).state_dict(), cfg, prefix="")
        assert original_to_controlnet(original, cfg).keys() == ControlNet(cfg).state_dict().keys()
        read = infer_controlnet_config(original, base=cfg.unet)
        # per-level transformer depth reads back as one count where only the levels with attention differ
        assert ControlNet(read).state_dict().keys() == ControlNet(cfg).state_dict().keys()
        assert dataclasses.replace(read.unet, transformer_depth=cfg.unet.transformer_depth) == cfg.unet
        assert (read.hint_channels, read.conditioning_channels) == (HINT, 3)
    # without a base: SD1's 8 heads (conv projections); linear ones, head width 64, SDXL's 256-wide size numbers
    sd1 = controlnet_to_original(ControlNet(SD1_SHAPED).state_dict(), SD1_SHAPED, prefix="")
    assert infer_controlnet_config(sd1).unet.num_heads == (8, 8, 8)
    with torch.device("meta"):
        full = ControlNetConfig(unet=SDXL_UNET)
        xl = controlnet_to_original(ControlNet(full).state_dict(), full, prefix="")
    read = infer_controlnet_config(xl)
    assert read.unet == dataclasses.replace(SDXL_UNET, sample_size=64) and read.hint_channels == (16, 32, 96, 256)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_diffusers_folder_and_single_file_load(tmp_path, name):
    cfg = CONFIGS[name]
    ref = reference(cfg)
    ref.save_pretrained(tmp_path / "folder")
    save_file(ref.state_dict(), tmp_path / "diffusers_names.safetensors")
    args = inputs(cfg)
    want = expected(ref, *args)
    folder = load_controlnet(tmp_path / "folder")
    assert folder.config == cfg and folder.load_report.layout == "diffusers"
    single = load_controlnet(tmp_path / "diffusers_names.safetensors", base=cfg.unet)
    assert single.load_report.layout == "diffusers_single_file"
    for ours in (folder, single):
        assert not ours.training and not any(p.requires_grad for p in ours.parameters())
        assert_residuals(ours(*args[:4], **args[4]), want)
    half = load_controlnet(tmp_path / "folder", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_from_unet_leaves_the_unet_unchanged(name):
    cfg = CONFIGS[name]
    ref_unet = reference_unet(cfg.unet)
    unet = UNet(cfg.unet).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    net = ControlNet.from_unet(unet, hint_channels=HINT).eval()
    # the encoder is the UNet's, as diffusers' ControlNetModel.from_unet copies it
    theirs = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=HINT).state_dict()
    ours = net.state_dict()
    assert ours.keys() == theirs.keys()
    fresh = ("controlnet_cond_embedding.conv_in.", "controlnet_cond_embedding.blocks.")  # random in both
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items() if not k.startswith(fresh))
    x, t, context, image, added = inputs(cfg)
    down, mid = net(x, t, context, image, **added)
    assert all(not r.any() for r in [*down, mid])
    plain = unet(x, t, context, **added)
    steered = unet(x, t, context, **added, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    torch.testing.assert_close(steered, plain, rtol=0, atol=0)
    # and it trains: the zero convs get gradients at once
    net.train().requires_grad_(True)
    with torch.enable_grad():
        down, mid = net(x, t, context, image, **added)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        unet(x, t, context, **added, **residuals).square().mean().backward()
    assert net.controlnet_mid_block.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_shuffle_pools_its_residuals(tmp_path):
    cfg = dataclasses.replace(SD1_SHAPED, global_pool_conditions=True)
    ref = reference(cfg)
    _original_file(ref, cfg, tmp_path / "control_v11e_sd15_shuffle.safetensors")
    ours = load_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors")  # the A1111 extension's name rule
    assert ours.config.global_pool_conditions
    args = inputs(cfg)
    down, mid = out = ours(*args[:4], guess_mode=True)
    assert_residuals(out, expected(ref, *args, guess_mode=True))
    assert mid.shape == (2, 64, 1, 1)
    unet = UNet(cfg.unet).eval()  # pooled residuals broadcast over each skip
    unet(args[0], args[1], args[2], down_block_additional_residuals=down, mid_block_additional_residual=mid)
    other = load_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors", global_pool=False)
    assert not other.config.global_pool_conditions


@torch.no_grad()
def test_bad_inputs_are_clear_errors():
    cfg = TINY_SD1_CONTROLNET
    net, unet = ControlNet(cfg).eval(), UNet(cfg.unet).eval()
    x, t, context, image, _ = inputs(cfg)
    with pytest.raises(InvalidInputError, match=r"condition image must be \(B=2 or 1, 3, 64, 96\)"):
        net(x, t, context, image[..., :64, :64])
    with pytest.raises(InvalidInputError, match="condition image"):
        net(x, t, context, image[:, :1])
    with pytest.raises(InvalidInputError, match="scale must be a number or 5 numbers"):
        net(x, t, context, image, [1.0, 1.0])
    with pytest.raises(InvalidInputError, match="takes no text_embeds"):
        net(x, t, context, image, text_embeds=torch.randn(2, 32), time_ids=torch.randn(2, 6))
    down, mid = net(x, t, context, image)
    with pytest.raises(InvalidInputError, match="come in pairs"):
        unet(x, t, context, down_block_additional_residuals=down)
    with pytest.raises(InvalidInputError, match="one tensor for each of the UNet's 4 skips; got 3"):
        unet(x, t, context, down_block_additional_residuals=down[:3], mid_block_additional_residual=mid)
    with pytest.raises(InvalidInputError, match=r"down_block_additional_residuals\[1\] has shape"):
        unet(x, t, context, down_block_additional_residuals=[down[0], down[1][:, :, :4]] + down[2:],
             mid_block_additional_residual=mid)
    with pytest.raises(InvalidInputError, match="mid_block_additional_residual has shape"):
        unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid[:, :8])
    xl = ControlNet(TINY_SDXL_CONTROLNET)
    with pytest.raises(InvalidInputError, match="needs text_embeds"):
        xl(x, t, torch.randn(2, 7, TINY_SDXL_CONTROLNET.unet.context_dim), image)


def test_files_that_are_not_plain_controlnets_are_refused(tmp_path):
    cases = {
        "lora.safetensors": ({"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)},
                             "Control-LoRA"),
        "sd.safetensors": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
                           "Stable Diffusion checkpoint, not a ControlNet"),
        "other.safetensors": ({"foo.weight": torch.zeros(1)}, "holds no ControlNet"),
        "bad_hint.safetensors": ({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
                                  "control_model.input_hint_block.4.weight": torch.zeros(16, 16, 3, 3)},
                                 "hint encoder convs"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / name)
        with pytest.raises(ArchitectureError, match=message):
            load_controlnet(tmp_path / name)
    # an original-layout ControlNet with a tensor it cannot place
    cfg = TINY_SD1_CONTROLNET
    original = controlnet_to_original(ControlNet(cfg).state_dict(), cfg)
    save_file({**original, "control_model.zero_convs.99.0.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ArchitectureError, match="fit no part of a ControlNet: zero_convs.99.0.weight"):
        load_controlnet(tmp_path / "extra.safetensors")


def test_a_controlnet_must_fit_its_unet():
    check_fits(TINY_SD1_CONTROLNET, TINY_SD1_CONTROLNET.unet)
    inpaint = dataclasses.replace(TINY_SD1_CONTROLNET.unet, in_channels=9)
    check_fits(TINY_SD1_CONTROLNET, inpaint)  # a ControlNet reads the 4 latent channels of an inpainting UNet
    with pytest.raises(ArchitectureError, match="text context is 128 wide, the UNet's 96"):
        check_fits(TINY_SD1_CONTROLNET, TINY_SDXL_CONTROLNET.unet)
    with pytest.raises(ArchitectureError, match="residuals do not fit the skips"):
        check_fits(SD1_SHAPED, dataclasses.replace(SD1_SHAPED.unet, layers_per_block=1))


@pytest.mark.parametrize("unet_cfg", [SD1.unet, SDXL_UNET], ids=["sd1", "sdxl"])
def test_full_size_keys_and_shapes_match_diffusers(unet_cfg):
    cfg = ControlNetConfig(unet=unet_cfg)
    with torch.device("meta"):
        ref = {k: v.shape for k, v in ControlNetModel(**_diffusers_args(cfg)).state_dict().items()}
        ours = {k: v.shape for k, v in ControlNet(cfg).state_dict().items()}
    assert ours == ref
    assert ref["controlnet_cond_embedding.conv_out.weight"] == (unet_cfg.block_channels[0], 256, 3, 3)


def test_diffusers_configs_read_back():
    for cfg in (*CONFIGS.values(), TINY_SD1_CONTROLNET, TINY_SDXL_CONTROLNET):
        assert ControlNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # as the hub's lllyasviel/control_v11p_sd15_canny config.json states it (ControlNetModel defaults elsewhere)
    hub = {"_class_name": "ControlNetModel", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
           "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb",
           "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "in_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "use_linear_projection": False,
           "global_pool_conditions": False, "class_embed_type": None, "num_class_embeds": None,
           "projection_class_embeddings_input_dim": None, "upcast_attention": False}
    assert ControlNetConfig.from_diffusers(hub) == ControlNetConfig(unet=SD1.unet)
    # and diffusers/controlnet-canny-sdxl-1.0's (SDXL base's encoder)
    xl = dict(hub, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
              down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
              addition_embed_type_num_heads=64, num_attention_heads=None)
    assert ControlNetConfig.from_diffusers(xl) == ControlNetConfig(unet=dataclasses.replace(SDXL_UNET, sample_size=64))
    with pytest.raises(ArchitectureError, match="conditioning_channel_order 'bgrx'"):
        ControlNetConfig.from_diffusers(dict(hub, controlnet_conditioning_channel_order="bgrx"))
