"""CLIP text encoder: parity with transformers' CLIPTextModel (SD1) and with an OpenCLIP-style
reference converted the way diffusers converts SD2's text encoder."""

import dataclasses
from collections import OrderedDict

import pytest
import torch
from conftest import assert_parity
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from sdtorch.configs import TINY_SD1, TINY_SD2, TextEncoderConfig
from sdtorch.errors import InvalidInputError
from sdtorch.models.clip import CLIPTextEncoder

BOS, EOS = 49406, 49407


def id_rows(cfg: TextEncoderConfig) -> torch.Tensor:
    """Two tokenizer-like rows: BOS, prompt ids, EOS, then padding (49407 for SD1, 0 for SD2)."""
    rows = []
    for n in (5, 20):
        words = torch.randint(300, 40000, (n,)).tolist()
        row = [BOS, *words, EOS]
        rows.append(row + [cfg.pad_token_id] * (cfg.max_length - len(row)))
    return torch.tensor(rows)


def randomize_(model: nn.Module) -> nn.Module:
    """Weights large enough for sharp attention; LayerNorms away from their (1, 0) init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.normal_(0.0, 0.1)
    return model


def hf_model(cfg: TextEncoderConfig) -> CLIPTextModel:
    """transformers' CLIPTextModel with the eager (non-SDPA) attention, random weights."""
    config = CLIPTextConfig(**cfg.to_diffusers())
    config._attn_implementation = "eager"
    return randomize_(CLIPTextModel(config)).eval()


def ours_from(cfg: TextEncoderConfig, state_dict: dict) -> CLIPTextEncoder:
    model = CLIPTextEncoder(cfg).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [TINY_SD1.text_encoder, TINY_SD2.text_encoder], ids=["sd1", "sd2"])
@torch.no_grad()
def test_matches_transformers(cfg):
    ref = hf_model(cfg)
    ours = ours_from(cfg, ref.state_dict())
    ids = id_rows(cfg)
    out = ref(ids, output_hidden_states=True)
    hidden = out.hidden_states  # (embeddings, layer 1, ..., layer n), before the final norm

    got = ours(ids)
    assert_parity(got, out.last_hidden_state)
    print(f"{cfg.activation} clip_skip=1 max err {max_err(got, out.last_hidden_state):.2e}")
    for skip in range(2, cfg.num_layers + 1):
        want = ref.final_layer_norm(hidden[-skip])
        got = ours(ids, clip_skip=skip)
        assert_parity(got, want)
        print(f"{cfg.activation} clip_skip={skip} max err {max_err(got, want):.2e}")
    assert max_err(ours(ids, clip_skip=2), out.last_hidden_state) > 1e-2  # the skip changes the output


@torch.no_grad()
def test_sd2_penultimate_of_a_longer_transformers_model():
    """Our num_layers model, given the first num_layers layers of a (num_layers + 1)-layer model,
    gives final_layer_norm of that model's penultimate layer: SD2's conditioning."""
    cfg = TINY_SD2.text_encoder
    full_cfg = dataclasses.replace(cfg, num_layers=cfg.num_layers + 1)
    ref = hf_model(full_cfg)
    last = f"encoder.layers.{cfg.num_layers}."
    ours = ours_from(cfg, {k: v for k, v in ref.state_dict().items() if not k.startswith(last)})
    ids = id_rows(cfg)
    want = ref.final_layer_norm(ref(ids, output_hidden_states=True).hidden_states[-2])
    got = ours(ids)
    assert_parity(got, want)
    print(f"sd2 penultimate (transformers) max err {max_err(got, want):.2e}")


class OpenCLIPStyleText(nn.Module):
    """An independent reference in OpenCLIP's layout: nn.MultiheadAttention with fused in_proj and
    explicit softmax (need_weights=True), exact GELU, an additive -inf causal mask. `skip_last` blocks
    are left out before ln_final, as SD2's FrozenOpenCLIPEmbedder does (layer="penultimate": 1)."""

    def __init__(self, cfg: TextEncoderConfig, blocks: int):
        super().__init__()
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, w))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(w),
                    "attn": nn.MultiheadAttention(w, cfg.num_heads, batch_first=True),
                    "ln_2": nn.LayerNorm(w),
                    "mlp": nn.Sequential(
                        OrderedDict(
                            c_fc=nn.Linear(w, cfg.mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(cfg.mlp_width, w)
                        )
                    ),
                }
            )
            for _ in range(blocks)
        )
        self.ln_final = nn.LayerNorm(w)

    def forward(self, ids: torch.Tensor, skip_last: int) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
        for block in self.transformer.resblocks[: len(self.transformer.resblocks) - skip_last]:
            h = block["ln_1"](x)
            x = x + block["attn"](h, h, h, attn_mask=mask, need_weights=True)[0]
            x = x + block["mlp"](block["ln_2"](x))
        return self.ln_final(x)


def convert_openclip(sd: dict, num_layers: int) -> dict:
    """OpenCLIP text keys -> transformers CLIPTextModel keys for the first `num_layers` blocks
    (fused in_proj split into q, k, v), as diffusers' SD2 conversion does."""
    out = {
        "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "final_layer_norm.weight": sd["ln_final.weight"],
        "final_layer_norm.bias": sd["ln_final.bias"],
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for a, b in names.items():
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
            q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3)
            out.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                        f"{dst}self_attn.v_proj.{kind}": v})  # fmt: skip
    return out


@torch.no_grad()
def test_sd2_matches_openclip_style_penultimate():
    cfg = TINY_SD2.text_encoder
    ref = randomize_(OpenCLIPStyleText(cfg, blocks=cfg.num_layers + 1)).eval()
    ours = ours_from(cfg, convert_openclip(ref.state_dict(), cfg.num_layers))
    ids = id_rows(cfg)
    for skip in (1, 2):  # A1111 clip skip 2 on SD2 drops one more block
        want, got = ref(ids, skip_last=skip), ours(ids, clip_skip=skip)
        assert_parity(got, want)
        print(f"sd2 openclip-style clip_skip={skip} max err {max_err(got, want):.2e}")


@torch.no_grad()
def test_meta_construction_and_assign_load():
    cfg = TINY_SD1.text_encoder
    ref = hf_model(cfg)
    sd = ref.state_dict()
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    assert not any(p.is_meta for p in model.parameters())
    ids = id_rows(cfg)
    assert_parity(model(ids), ref(ids).last_hidden_state)


@torch.no_grad()
def test_clip_skip_stops_early():
    cfg = TINY_SD1.text_encoder
    model = CLIPTextEncoder(cfg).eval()
    calls = []
    model.encoder.layers[-1].register_forward_hook(lambda *_: calls.append(1))
    model(id_rows(cfg), clip_skip=2)
    assert calls == []
    model(id_rows(cfg), clip_skip=1)
    assert calls == [1]


def test_shorter_rows_match_prefix_of_full_rows():
    """Causal attention: the first k outputs depend only on the first k ids."""
    cfg = TINY_SD1.text_encoder
    model = randomize_(CLIPTextEncoder(cfg)).eval()
    ids = id_rows(cfg)
    with torch.no_grad():
        assert_parity(model(ids[:, :10]), model(ids)[:, :10])


@pytest.mark.parametrize(
    "ids, clip_skip",
    [
        (torch.full((1, 77), EOS), 0),
        (torch.full((1, 77), EOS), 3),  # the tiny model has 2 layers
        (torch.full((1, 77), EOS), 1.5),
        (torch.full((1, 78), EOS), 1),
        (torch.full((1, 0), EOS), 1),
        (torch.full((77,), EOS), 1),
        (torch.full((1, 77), 49408), 1),
        (torch.full((1, 77), -1), 1),
        (torch.full((1, 77), 1.0), 1),
    ],
    ids=[
        "skip0", "skip_too_big", "skip_float", "too_long", "empty", "1d", "id_too_big", "negative_id", "float_ids"
    ],  # fmt: skip
)
def test_bad_input_raises(ids, clip_skip):
    model = CLIPTextEncoder(TINY_SD1.text_encoder)
    with pytest.raises(InvalidInputError):
        model(ids, clip_skip=clip_skip)
