"""IP-Adapter against diffusers with identical (random) weights: the image projections (ImageProjection,
IPAdapterPlusImageProjection), and the UNet with an installed adapter against UNet2DConditionModel after
`_load_ip_adapter_weights` of the same original-format tensors, SD1- and SDXL-shaped, base and plus; files written
in the original layouts (.bin and .safetensors) load to the same output; scale 0 and removal give the plain UNet."""

import dataclasses

import pytest
import torch
from conftest import assert_parity
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection as DiffusersImageProjection
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors.torch import save_file

from sdtorch.checkpoints.ip_adapter_files import (
    infer_ip_adapter_config,
    ip_adapter_to_original,
    load_ip_adapter,
    original_to_ip_adapter,
)
from sdtorch.configs import SD1, SDXL_UNET, UNetConfig
from sdtorch.errors import ArchitectureError, CheckpointError, InvalidInputError, UnsafeCheckpointError
from sdtorch.models.clip_vision import CLIPImageEncoder, CLIPVisionConfig
from sdtorch.models.ip_adapter import (
    ImageProjection,
    IPAdapter,
    IPAdapterConfig,
    Resampler,
    cross_attentions,
    install_ip_adapter,
    installed_ip_adapter_tokens,
    remove_ip_adapter,
    with_image_tokens,
)
from sdtorch.models.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

POOLED = 16
# tests/test_controlnet.py's tiny SD1 and SDXL shapes: SD1 with conv projections and attention on the first two
# levels; SDXL with none on level 0, transformer depth 1 and 2, linear projections and the addition embedding
UNETS = {
    "sd1": UNetConfig(block_channels=(32, 64, 64), attention_levels=(True, True, False), layers_per_block=2,
                      num_heads=(8, 8, 8), context_dim=48),
    "sdxl": UNetConfig(block_channels=(32, 64, 64), attention_levels=(False, True, True), layers_per_block=2,
                       num_heads=(2, 4, 4), context_dim=32, use_linear_proj=True, transformer_depth=(0, 1, 2),
                       addition_time_embed_dim=8, addition_in_dim=POOLED + 6 * 8),
}
EMBED = 24  # base: the image encoder's projection_dim
HIDDEN = 40  # plus: the image encoder's width
PATCHES = 9  # plus: its hidden states' length (class token + patches)


def _perturb(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or not p.any():
                p.add_(scale * torch.randn_like(p))
    return model.eval()


def unets(cfg: UNetConfig) -> tuple[UNet2DConditionModel, UNet]:
    ref = _perturb(UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}))
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def adapter_config(kind: str, unet: UNet) -> IPAdapterConfig:
    dims = tuple(attn.to_q.out_features for _, attn in cross_attentions(unet))
    context = unet.config.context_dim
    if kind == "base":
        return IPAdapterConfig("base", EMBED, context, 4, dims)
    # diffusers' reader assumes what the released models have: 64-wide heads, 4 blocks, a 4x feed-forward
    return IPAdapterConfig("plus", HIDDEN, context, 6, dims, hidden_dim=32, depth=4, heads=1, head_dim=64, ff_dim=128)


def random_original(config: IPAdapterConfig) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter file's two parts, random, in the original names."""
    adapter = IPAdapter(config)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return ip_adapter_to_original(adapter.state_dict(), config)


def write(parts: dict[str, dict[str, torch.Tensor]], path) -> None:
    """As IP-Adapter's files are: a torch.save of the two dicts, or one safetensors file with prefixed keys."""
    if str(path).endswith(".safetensors"):
        save_file({f"{part}.{k}": v.contiguous() for part, sd in parts.items() for k, v in sd.items()}, path)
    else:
        torch.save(parts, path)


def inputs(cfg: UNetConfig, batch: int = 2):
    x = torch.randn(batch, 4, 8, 8)
    t = torch.tensor([999, 17][:batch])
    context = torch.randn(batch, 7, cfg.context_dim)
    added = {}
    if cfg.has_addition:
        ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 832, 1216]][:batch],
                           dtype=torch.float32)
        added = {"text_embeds": torch.randn(batch, POOLED), "time_ids": ids}
    return x, t, context, added


def image_inputs(kind: str, batch: int = 2, images: int = 1) -> torch.Tensor:
    """(B, images, E) image_embeds or (B, images, S, E) hidden states: diffusers' `image_embeds` entry."""
    return torch.randn(batch, images, EMBED) if kind == "base" else torch.randn(batch, images, PATCHES, HIDDEN)


def diffusers_scale(ref: UNet2DConditionModel, scale: float) -> None:
    for processor in ref.attn_processors.values():
        if isinstance(processor, IPAdapterAttnProcessor2_0):
            processor.scale = [scale] * len(processor.scale)


@torch.no_grad()
def test_image_projection_equals_diffusers():
    ref = _perturb(DiffusersImageProjection(image_embed_dim=EMBED, cross_attention_dim=48, num_image_text_embeds=4))
    ours = ImageProjection(EMBED, 48, 4).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict(), strict=True)
    embeds = torch.randn(3, EMBED)
    assert_parity(ours(embeds), ref(embeds))


@torch.no_grad()
def test_resampler_equals_diffusers():
    # heads of width 8 (not 64), two blocks, a 3x feed-forward: every size taken from the arguments
    ref = _perturb(IPAdapterPlusImageProjection(embed_dims=HIDDEN, output_dims=48, hidden_dims=32, depth=2,
                                                dim_head=8, heads=4, num_queries=5, ffn_ratio=3))
    ours = Resampler(HIDDEN, 48, 32, depth=2, heads=4, num_queries=5, head_dim=8, ff_dim=96).eval()
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict(), strict=True)
    features = torch.randn(3, PATCHES, HIDDEN)
    assert_parity(ours(features), ref(features))


@pytest.mark.parametrize("name", list(UNETS))
def test_layer_order_is_diffusers(name):
    """The files number diffusers' attention processors: down blocks, up blocks, then the mid block."""
    ref, ours = unets(UNETS[name])
    expected = [n.removesuffix(".processor") for n in ref.attn_processors if n.endswith("attn2.processor")]
    assert [n for n, _ in cross_attentions(ours)] == expected
    assert expected[-1].startswith("mid_block")


@pytest.mark.parametrize("kind", ["base", "plus"])
@pytest.mark.parametrize("name", list(UNETS))
@torch.no_grad()
def test_unet_with_ip_adapter_equals_diffusers(name, kind, tmp_path):
    cfg = UNETS[name]
    ref, ours = unets(cfg)
    config = adapter_config(kind, ours)
    parts = random_original(config)
    path = tmp_path / ("adapter.bin" if kind == "base" else "adapter.safetensors")
    write(parts, path)
    ref._load_ip_adapter_weights({p: dict(sd) for p, sd in parts.items()})

    adapter = load_ip_adapter(path, unet=ours)
    assert adapter.config == config and adapter.load_report.kind == kind
    assert not adapter.training and not any(p.requires_grad for p in adapter.parameters())
    install_ip_adapter(ours, adapter)
    assert installed_ip_adapter_tokens(ours) == config.num_tokens

    x, t, context, added = inputs(cfg)
    embeds = image_inputs(kind)
    copies = [a.clone() for a in (x, context, embeds)]
    for scale in (1.0, 0.6):
        adapter.scale = scale
        diffusers_scale(ref, scale)
        expected = ref(x, t, context, added_cond_kwargs={**added, "image_embeds": [embeds]}).sample
        tokens = adapter(embeds[:, 0])  # (B, T, D)
        assert tokens.shape == (2, config.num_tokens, cfg.context_dim)
        assert_parity(ours(x, t, with_image_tokens(context, tokens), **added), expected)
    assert all(torch.equal(a, b) for a, b in zip((x, context, embeds), copies)), "inputs were modified"

    # two images for the adapter: their tokens one after the other, as diffusers concatenates them
    embeds = image_inputs(kind, images=2)
    expected = ref(x, t, context, added_cond_kwargs={**added, "image_embeds": [embeds]}).sample
    with pytest.raises(InvalidInputError, match="num_images"):
        adapter(embeds)
    adapter.num_images = 2
    assert_parity(ours(x, t, with_image_tokens(context, adapter(embeds)), **added), expected)


@torch.no_grad()
def test_two_adapters_equal_diffusers(tmp_path):
    """A base and a plus adapter at once: tokens appended in install order, diffusers' list order."""
    cfg = UNETS["sd1"]
    ref, ours = unets(cfg)
    plain = {k: v.clone() for k, v in ref.state_dict().items()}
    parts = [random_original(adapter_config(kind, ours)) for kind in ("base", "plus")]
    ref._load_ip_adapter_weights(parts)
    adapters = []
    for i, p in enumerate(parts):
        write(p, tmp_path / f"a{i}.safetensors")
        adapters.append(load_ip_adapter(tmp_path / f"a{i}.safetensors", unet=cfg))
        install_ip_adapter(ours, adapters[-1], scale=0.7)
    diffusers_scale(ref, 0.7)
    x, t, context, _ = inputs(cfg)
    embeds = [image_inputs("base"), image_inputs("plus")]
    expected = ref(x, t, context, added_cond_kwargs={"image_embeds": embeds}).sample
    tokens = [a(e[:, 0]) for a, e in zip(adapters, embeds)]
    assert_parity(ours(x, t, with_image_tokens(context, *tokens)), expected)
    # removing one leaves the other
    remove_ip_adapter(ours, adapters[0])
    assert installed_ip_adapter_tokens(ours) == adapters[1].config.num_tokens
    ref, _ = unets(cfg)
    ref.load_state_dict(plain, strict=True)
    ref._load_ip_adapter_weights([parts[1]])
    diffusers_scale(ref, 0.7)
    expected = ref(x, t, context, added_cond_kwargs={"image_embeds": [embeds[1]]}).sample
    assert_parity(ours(x, t, with_image_tokens(context, tokens[1])), expected)


def test_released_shapes():
    """The released files' shapes (on the meta device) read back as their variants and fit SD1.5 / SDXL: 16 and 70
    cross-attentions (ip_adapter.1 .. 31 and .1 .. 139)."""
    released = {  # name: (UNet, kind, image embedding width, Resampler width)
        "ip-adapter_sd15": (SD1.unet, "base", 1024, 0),  # ViT-H image_embeds
        "ip-adapter-plus_sd15": (SD1.unet, "plus", 1280, 768),  # ViT-H hidden states, 12 heads
        "ip-adapter_sdxl": (SDXL_UNET, "base", 1280, 0),  # ViT-bigG image_embeds
        "ip-adapter-plus_sdxl_vit-h": (SDXL_UNET, "plus", 1280, 1280),  # 20 heads
    }
    for name, (unet_cfg, kind, embed, hidden) in released.items():
        with torch.device("meta"):
            unet = UNet(unet_cfg)
        dims = tuple(attn.to_q.out_features for _, attn in cross_attentions(unet))
        assert len(dims) == (16 if unet_cfg is SD1.unet else 70), name
        extra = dict(hidden_dim=hidden, depth=4, heads=hidden // 64, ff_dim=4 * hidden) if kind == "plus" else {}
        config = IPAdapterConfig(kind, embed, unet_cfg.context_dim, 4 if kind == "base" else 16, dims, **extra)
        with torch.device("meta"):
            parts = ip_adapter_to_original(IPAdapter(config).state_dict(), config)
        if kind == "base":
            assert parts["image_proj"]["proj.weight"].shape == (4 * unet_cfg.context_dim, embed)
        else:
            assert parts["image_proj"]["latents"].shape == (1, 16, hidden)
        assert f"{2 * len(dims) - 1}.to_v_ip.weight" in parts["ip_adapter"]
        assert infer_ip_adapter_config(parts["image_proj"], parts["ip_adapter"], source=name) == config


@torch.no_grad()
def test_scale_zero_and_removal_give_the_plain_unet():
    cfg = UNETS["sdxl"]
    _, ours = unets(cfg)
    keys, text = list(ours.state_dict()), repr(ours)
    x, t, context, added = inputs(cfg)
    plain = ours(x, t, context, **added)
    adapter = IPAdapter(adapter_config("plus", ours)).eval()
    _perturb(adapter, 0.5)
    install_ip_adapter(ours, adapter, scale=0.0)
    tokens = adapter(torch.randn(2, PATCHES, HIDDEN))
    assert torch.equal(ours(x, t, with_image_tokens(context, tokens), **added), plain)
    adapter.scale = 1.0
    assert not torch.allclose(ours(x, t, with_image_tokens(context, tokens), **added), plain, atol=1e-3)
    # batch-1 tokens are shared by every row
    shared = ours(x, t, with_image_tokens(context, tokens[:1]), **added)
    assert_parity(shared, ours(x, t, with_image_tokens(context, tokens[:1].expand(2, -1, -1)), **added))
    remove_ip_adapter(ours)
    assert list(ours.state_dict()) == keys and repr(ours) == text
    assert all(attn.image_attentions is None for _, attn in cross_attentions(ours))
    assert torch.equal(ours(x, t, context, **added), plain)


@torch.no_grad()
def test_sdpa_without_mask(monkeypatch):
    """Every attention, the image branches' too, goes through F.scaled_dot_product_attention without a mask."""
    cfg = UNETS["sd1"]
    _, ours = unets(cfg)
    adapter = IPAdapter(adapter_config("base", ours)).eval()
    install_ip_adapter(ours, adapter)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((k.shape[2], args, kwargs))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    x, t, context, _ = inputs(cfg)
    x = torch.randn(2, 4, 16, 16)  # no self-attention over 4 or 7 pixels
    ours(x, t, with_image_tokens(context, adapter(torch.randn(2, EMBED))))
    layers = len(cross_attentions(ours))
    assert all(not args and not kwargs for _, args, kwargs in calls)  # no mask, no is_causal
    assert sum(length == 7 for length, _, _ in calls) == layers  # text: 7 tokens
    assert sum(length == 4 for length, _, _ in calls) == layers  # image: 4 tokens
    assert len(calls) == 3 * layers  # and one self-attention each


def test_original_layout_round_trip():
    _, ours = unets(UNETS["sdxl"])
    for kind in ("base", "plus"):
        config = adapter_config(kind, ours)
        sd = IPAdapter(config).state_dict()
        parts = ip_adapter_to_original(sd, config)
        assert infer_ip_adapter_config(parts["image_proj"], parts["ip_adapter"]) == config
        back = original_to_ip_adapter(parts["image_proj"], parts["ip_adapter"], config)
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        numbers = sorted({int(k.split(".")[0]) for k in parts["ip_adapter"]})
        assert numbers == list(range(1, 2 * len(config.layer_dims), 2))
    # the original Resampler's names, as IP-Adapter's resampler.py makes them
    assert {"latents", "layers.0.0.to_kv.weight", "layers.3.0.norm2.bias", "layers.1.1.3.weight",
            "layers.2.1.0.weight", "norm_out.weight"} <= set(parts["image_proj"])


@torch.no_grad()
def test_embed_images():
    vision = CLIPVisionConfig(width=HIDDEN, num_layers=3, num_heads=4, mlp_width=64, projection_dim=EMBED,
                              image_size=28, patch_size=14)
    encoder = _perturb(CLIPImageEncoder(vision))
    pixels = torch.randn(2, 3, 28, 28)
    _, ours = unets(UNETS["sd1"])
    base, plus = (IPAdapter(adapter_config(kind, ours)).eval() for kind in ("base", "plus"))
    positive, negative = base.embed_images(encoder, pixels)
    assert torch.equal(positive, encoder(pixels).image_embeds) and not negative.any()
    positive, negative = plus.embed_images(encoder, pixels)
    zeros = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    assert torch.equal(positive, encoder(pixels, output_hidden_states=True).hidden_states[-2])
    assert torch.equal(negative, zeros) and positive.shape == (2, 5, HIDDEN)
    wrong = CLIPImageEncoder(dataclasses.replace(vision, projection_dim=EMBED + 8))
    with pytest.raises(ArchitectureError, match="image encoder"):
        base.embed_images(wrong, pixels)


def test_errors(tmp_path):
    _, sd1 = unets(UNETS["sd1"])
    _, sdxl = unets(UNETS["sdxl"])
    with pytest.raises(CheckpointError, match="no such file"):
        load_ip_adapter(tmp_path / "missing.bin")
    with pytest.raises(CheckpointError, match="folder"):
        load_ip_adapter(tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"\x80\x02junk that is no pickle")
    with pytest.raises(CheckpointError):
        load_ip_adapter(tmp_path / "junk.bin")
    save_file({"model.diffusion_model.out.0.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    with pytest.raises(ArchitectureError, match="not an IP-Adapter"):
        load_ip_adapter(tmp_path / "model.safetensors")

    class Payload:  # a pickle that asks for an object: refused by the weights_only reader
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"image_proj": {"proj.weight": Payload()}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError):
        load_ip_adapter(tmp_path / "evil.bin")

    # variants not built here
    parts = random_original(adapter_config("base", sd1))
    full_face = {"image_proj": {"proj.0.weight": torch.ones(8, 8), "proj.3.weight": torch.ones(8)},
                 "ip_adapter": parts["ip_adapter"]}
    write(full_face, tmp_path / "full_face.bin")
    with pytest.raises(ArchitectureError, match="Full Face"):
        load_ip_adapter(tmp_path / "full_face.bin")
    faceid = {"image_proj": parts["image_proj"],
              "ip_adapter": {**parts["ip_adapter"], "0.to_q_lora.down.weight": torch.ones(4, 8)}}
    write(faceid, tmp_path / "faceid.bin")
    with pytest.raises(ArchitectureError, match="FaceID"):
        load_ip_adapter(tmp_path / "faceid.bin")
    broken = {"image_proj": parts["image_proj"], "ip_adapter": dict(list(parts["ip_adapter"].items())[2:])}
    write(broken, tmp_path / "broken.bin")
    with pytest.raises(ArchitectureError, match="numbered"):
        load_ip_adapter(tmp_path / "broken.bin")

    # an adapter for another model family
    write(parts, tmp_path / "sd1.safetensors")
    with pytest.raises(ArchitectureError, match="another model family"):
        load_ip_adapter(tmp_path / "sd1.safetensors", unet=UNETS["sdxl"])
    adapter = load_ip_adapter(tmp_path / "sd1.safetensors", unet=sd1)
    with pytest.raises(ArchitectureError, match="another model family"):
        install_ip_adapter(sdxl, adapter)
    assert installed_ip_adapter_tokens(sdxl) == 0  # nothing half-installed

    # use
    install_ip_adapter(sd1, adapter)
    with pytest.raises(InvalidInputError, match="already installed"):
        install_ip_adapter(sd1, adapter)
    x, t, _, _ = inputs(UNETS["sd1"])
    with pytest.raises(InvalidInputError, match="image tokens"):
        sd1(x, t, torch.randn(2, 4, 48))  # a context of only the 4 image tokens (no text)
    with pytest.raises(InvalidInputError, match="24-wide"):
        adapter(torch.randn(2, EMBED + 1))
    with pytest.raises(InvalidInputError):
        adapter(torch.randn(EMBED))
    with pytest.raises(InvalidInputError):
        with_image_tokens(torch.randn(2, 7, 48), torch.randn(3, 4, 48))
    with pytest.raises(InvalidInputError):
        adapter.scale = float("nan")
    with pytest.raises(InvalidInputError):
        load_ip_adapter(tmp_path / "sd1.safetensors", dtype=torch.int8)
    plus = random_original(adapter_config("plus", sd1))
    write(plus, tmp_path / "plus.bin")
    with pytest.raises(InvalidInputError, match="heads"):
        load_ip_adapter(tmp_path / "plus.bin", heads=3)
    assert load_ip_adapter(tmp_path / "plus.bin", heads=4).config.head_dim == 16


def test_float16_loading(tmp_path):
    _, ours = unets(UNETS["sd1"])
    write(random_original(adapter_config("plus", ours)), tmp_path / "plus.safetensors")
    adapter = load_ip_adapter(tmp_path / "plus.safetensors", dtype=torch.float16, scale=0.5)
    assert {p.dtype for p in adapter.parameters()} == {torch.float16} and adapter.scale == 0.5
    tokens = adapter(torch.randn(1, PATCHES, HIDDEN))  # float32 embeddings are cast to the weights' dtype
    assert tokens.dtype == torch.float16
