"""SDXL's text conditioning: both encoders against transformers, the pooled embedding, per-encoder emphasis, configs."""

import dataclasses

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conftest import assert_parity
from sdtorch.configs import SDXL, SDXL_REFINER, TINY_SDXL, TINY_SDXL_REFINER, ModelConfig, TextEncoderConfig
from sdtorch.errors import ArchitectureError, InvalidInputError
from sdtorch.models.sdxl_text import SDXLTextEncoder, repad, text_encoder_for
from sdtorch.models.tokenizer import CLIPTokenizer
from sdtorch.prompts import encode_prompt_groups, encode_prompts, tokenize_prompt

BOS, EOS = 49406, 49407


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return module.eval()


def transformers_twin(config: TextEncoderConfig, state: dict) -> torch.nn.Module:
    """transformers' CLIPTextModel(WithProjection) with the weights of one sdtorch encoder."""
    hf_config = CLIPTextConfig(**config.to_diffusers())
    hf_config._attn_implementation = "eager"
    if config.with_projection:
        model = CLIPTextModelWithProjection(hf_config)
        state = {k if k.startswith("text_projection") else "text_model." + k: v for k, v in state.items()}
    else:
        model = CLIPTextModel(hf_config)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(3)
    return randomized(SDXLTextEncoder(TINY_SDXL.text_encoders))


@pytest.fixture(scope="module")
def twins(encoder):
    return [transformers_twin(e.config, e.state_dict()) for e in encoder.encoders]


def ids_with_padding(pad: int) -> torch.Tensor:
    """Two rows as a ViT-L tokenizer (pad = EOS) or a bigG one (pad = 0) writes them."""
    rows = [[BOS, 320, 1929, 530, EOS], [BOS, 555, EOS]]
    return torch.tensor([r + [pad] * (77 - len(r)) for r in rows])


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_context_and_pooled_equal_transformers(encoder, twins, clip_skip):
    context, pooled = encoder.encode(ids_with_padding(EOS), clip_skip=clip_skip)
    first = twins[0](ids_with_padding(EOS), output_hidden_states=True)
    second = twins[1](ids_with_padding(0), output_hidden_states=True)
    reference = torch.cat([first.hidden_states[-(clip_skip + 1)], second.hidden_states[-(clip_skip + 1)]], dim=-1)
    assert_parity(context, reference)
    assert_parity(pooled, second.text_embeds)  # the projection of the final-normed EOS state, at any clip skip
    assert_parity(encoder(ids_with_padding(EOS), clip_skip=clip_skip), reference)


@torch.no_grad()
def test_the_encoders_read_the_same_ids_whatever_the_tokenizer_pads_with(encoder):
    by_eos, by_zero = encoder.encode(ids_with_padding(EOS)), encoder.encode(ids_with_padding(0))
    assert torch.equal(by_eos[0], by_zero[0]) and torch.equal(by_eos[1], by_zero[1])


def test_repad_changes_only_what_follows_the_first_eos():
    ids = torch.tensor([[BOS, 5, EOS, EOS, EOS], [BOS, 5, 6, 7, EOS], [BOS, EOS, 0, 0, 0]])
    assert repad(ids, EOS, 0).tolist() == [[BOS, 5, EOS, 0, 0], [BOS, 5, 6, 7, EOS], [BOS, EOS, 0, 0, 0]]
    assert repad(ids, EOS, EOS).tolist() == [[BOS, 5, EOS, EOS, EOS], [BOS, 5, 6, 7, EOS], [BOS, EOS, EOS, EOS, EOS]]


@torch.no_grad()
def test_refiner_conditions_on_big_g_alone():
    torch.manual_seed(4)
    encoder = randomized(text_encoder_for(TINY_SDXL_REFINER))
    twin = transformers_twin(encoder.encoders[0].config, encoder.encoders[0].state_dict())
    context, pooled = encoder.encode(ids_with_padding(0))
    out = twin(ids_with_padding(0), output_hidden_states=True)
    assert encoder.part_widths == (64,)
    assert_parity(context, out.hidden_states[-2])
    assert_parity(pooled, out.text_embeds)


@torch.no_grad()
def test_emphasis_weights_each_encoder_on_its_own(encoder):
    """A1111 runs each SDXL embedder through its own emphasis: the token weights, then the mean of that encoder's
    (77, width) output restored, so one encoder's scale never leaks into the other's part."""
    tokenizer = CLIPTokenizer.default()
    prompt = "a (red:1.5) circle"
    ours = encode_prompts(tokenizer, encoder, [prompt])[0]  # (77, 96)
    chunk = tokenize_prompt(tokenizer, prompt)[0]
    raw = encoder(torch.tensor([chunk.tokens]))[0]  # (77, 96)
    weights = torch.tensor(chunk.multipliers)[:, None]
    expected = []
    for part in raw.split(list(encoder.part_widths), dim=-1):
        weighted = part * weights
        expected.append(weighted * (part.mean() / weighted.mean()))
    assert_parity(ours, torch.cat(expected, dim=-1))
    _, pooled = encode_prompt_groups(tokenizer, encoder, [[prompt, "a dog " * 50]])
    long_first_chunk = tokenize_prompt(tokenizer, "a dog " * 50)[0]
    assert_parity(pooled[0][0], encoder.encode(torch.tensor([chunk.tokens]))[1][0])  # emphasis leaves it alone
    assert_parity(pooled[0][1], encoder.encode(torch.tensor([long_first_chunk.tokens]))[1][0])  # first chunk's


def test_clip_skip_past_the_usable_layers_is_refused(encoder):
    with pytest.raises(InvalidInputError, match="penultimate"):
        encoder(ids_with_padding(EOS), clip_skip=3)  # 3 layers: the last usable hidden state is the first layer's


def test_full_size_configs_and_round_trip():
    assert (SDXL.pooled_dim, SDXL.num_time_ids, SDXL.unet.context_dim) == (1280, 6, 768 + 1280)
    assert (SDXL_REFINER.pooled_dim, SDXL_REFINER.num_time_ids, SDXL_REFINER.unet.context_dim) == (1280, 5, 1280)
    for config in (SDXL, SDXL_REFINER, TINY_SDXL, TINY_SDXL_REFINER):
        assert ModelConfig.from_dict(config.to_dict()) == config
    assert "text_encoder_2" not in ModelConfig().to_dict()  # SD1/SD2 files stay readable by older sdtorch


@pytest.mark.parametrize("change, message", [
    (dict(text_encoder_2=None), "text_projection"),
    (dict(text_encoder_2=dataclasses.replace(TINY_SDXL.text_encoder_2, width=128)), "widths add up"),
    (dict(family="sd1"), "one text encoder"),
    (dict(text_encoder_2=dataclasses.replace(TINY_SDXL.text_encoder_2, with_projection=False)), "text_projection"),
    (dict(text_encoder=dataclasses.replace(TINY_SDXL.text_encoder, hidden_state_output=False)), "hidden state"),
])
def test_inconsistent_sdxl_configs_are_refused(change, message):
    with pytest.raises(ArchitectureError, match=message):
        TINY_SDXL.replace(**change)
