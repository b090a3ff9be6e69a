"""The CLIP tokenizer against transformers' CLIPTokenizer on the real CLIP vocabulary."""

import json
import os
import random

import pytest
import torch
import transformers

from sdtorch.errors import CheckpointError, InvalidInputError
from sdtorch.models.tokenizer import CLIPTokenizer

ASTRONAUT = "a photograph of an astronaut riding a horse"
ASTRONAUT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]

_WORDS = (
    "a photo of an astronaut riding horse on mars highly detailed portrait woman man cat dog castle forest "
    "sunset oil painting by greg rutkowski trending artstation 8k uhd octane render cinematic lighting "
    "masterpiece best quality ultra-detailed bokeh hdr photorealistic anime girl blue eyes red hair "
    "cyberpunk city night neon rain reflections steampunk watercolor sketch unreal engine volumetric fog"
).split()
_FRAGMENTS = [
    "(masterpiece:1.2)", "[bad]", "<lora:x:1>", "((best quality))", "[[low res]]", "{a|b|c}",
    "(worst quality:1.4)", "[cat:dog:0.5]", "<hypernet:foo:0.8>", "embedding:easyneg", "BREAK",
    "it's", "they're", "we've", "I'm", "you'll", "he'd", "don't", "DON'T", "rock'n'roll", "''quoted''",
    "&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&amp;amp;", "&nbsp;",
    "café", "naïve", "Crème Brûlée", "São Paulo", "Zürich", "Ærøskøbing", "cafe\u0301", "n\u0303o",
    "東京タワー", "猫と犬", "한국어 문장", "北京烤鸭", "ﾊﾝｶｸ", "ＦＵＬＬＷＩＤＴＨ", "ΣΟΦΙΑ ΟΔΟΣ", "Привет МИР",
    "مرحبا", "שלום", "नमस्ते", "ภาษาไทย", "İstanbul", "STRASSE ß", "ﬁne", "Ⅻ ½ ² ³", "٣٤٥", "①②",
    "🙂", "🐱‍👤", "👍🏽", "🇯🇵", "❤️", "✨✨✨", "🔥🔥", "👨‍👩‍👧‍👦",
    "1girl", "2boys", "1024x768", "3.14159", "100%", "-0.5", "1,000,000", "v1.5", "4k", "2024-01-01",
    "!!!", "???", "...", "—", "--", "~~", "***", "@#$%^&*", ",,,", ";:", "|||", "\\\\", "//", "__init__",
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext|>'s", "x<|startoftext|>y", "<|endoftext|>!!",
    "\u200b", "\ufeff", "\u00ad", "\x00", "\x1c", "a\u0345b", "\u2028", "ǅ", "K",
]
_SPACES = [" ", " ", " ", ", ", "  ", "\t", "\n", "\r\n", " \u00a0", "\u3000", "\u2003", "\x0b", ""]


def _prompts() -> list[str]:
    """At least 500 varied prompts, the same every run."""
    rng = random.Random(1234)
    prompts = ["", " ", "\t\n ", ASTRONAUT, "  leading and trailing  ", "A" * 300, "aaaaaaaaaaa", "hahahahaha"]
    prompts += _FRAGMENTS
    for _ in range(560):
        n = rng.choice([1, 2, 4, 8, 16, 40, 90])  # the long ones run far past 77 tokens
        parts = [rng.choice(_WORDS) if rng.random() < 0.6 else rng.choice(_FRAGMENTS) for _ in range(n)]
        parts = [p.upper() if rng.random() < 0.1 else p.capitalize() if rng.random() < 0.1 else p for p in parts]
        text = "".join(p + rng.choice(_SPACES) for p in parts)
        prompts.append(rng.choice(_SPACES) + text if rng.random() < 0.2 else text)
    return prompts


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def sd1():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def sd2():
    return CLIPTokenizer.default(pad_token="!")


@pytest.fixture(scope="module")
def hf_sd1(sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1_tokenizer")
    sd1.save(folder)
    return transformers.CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf_sd2(sd2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2_tokenizer")
    sd2.save(folder)
    return transformers.CLIPTokenizer.from_pretrained(folder)


def _hf_ids(hf, prompts):
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def _assert_same_rows(ours: torch.Tensor, ref: torch.Tensor, prompts: list[str]) -> None:
    assert ours.shape == ref.shape == (len(prompts), 77)
    bad = [i for i in range(len(prompts)) if not torch.equal(ours[i], ref[i])]
    assert not bad, f"{len(bad)} prompts differ, first {prompts[bad[0]]!r}: {ours[bad[0]].tolist()} != {ref[bad[0]].tolist()}"


def test_vocabulary_facts(sd1, sd2):
    assert len(PROMPTS) >= 500
    assert sd1.vocab_size == 49408 and sd1.max_length == 77
    assert (sd1.bos_token_id, sd1.eos_token_id, sd1.pad_token_id) == (49406, 49407, 49407)
    assert (sd2.bos_token_id, sd2.eos_token_id, sd2.pad_token_id) == (49406, 49407, 0)


def test_known_example(sd1, hf_sd1):
    ids = sd1(ASTRONAUT)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == ASTRONAUT_IDS + [49407] * (77 - len(ASTRONAUT_IDS))
    assert sd1.encode(ASTRONAUT) == ASTRONAUT_IDS[1:-1]
    assert hf_sd1(ASTRONAUT).input_ids == ASTRONAUT_IDS


def test_sd1_matches_transformers(sd1, hf_sd1):
    assert hf_sd1.pad_token_id == 49407
    _assert_same_rows(sd1(PROMPTS), _hf_ids(hf_sd1, PROMPTS), PROMPTS)


def test_encode_matches_transformers_without_truncation(sd1, hf_sd1):
    ref = hf_sd1(PROMPTS, add_special_tokens=False).input_ids
    bad = [p for p, r in zip(PROMPTS, ref) if sd1.encode(p) != r]
    assert not bad, f"{len(bad)} prompts differ, first {bad[0]!r}"
    assert sum(len(r) > 75 for r in ref) > 50  # many prompts really run past the 77-token window


def test_truncation_keeps_eos_last(sd1):
    row = sd1(["word " * 200])[0]
    assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] == sd1.encode("word")[0]).all()


def test_sd2_pad_token_matches_transformers(sd2, hf_sd2):
    """SD2 pads with "!" (id 0); transformers then also cuts every literal "!" out as id 0."""
    assert hf_sd2.pad_token == "!" and hf_sd2.pad_token_id == 0
    prompts = PROMPTS + ["wow!!! great!", "short"]
    ours = sd2(prompts)
    _assert_same_rows(ours, _hf_ids(hf_sd2, prompts), prompts)
    assert ours[-1].tolist() == [49406, 3005, 49407] + [0] * 74
    assert sd2.encode("wow!!!") == [2781, 0, 0, 0]


def test_save_and_from_folder_round_trip(sd2, tmp_path):
    sd2.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
    ]  # no temp files left behind
    first = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")[:2]
    assert first == ["#version: 0.2", "i n"]
    sd2.save(tmp_path)  # saving over an existing folder replaces the files
    loaded = CLIPTokenizer.from_folder(tmp_path)
    assert (loaded.pad_token_id, loaded.max_length, loaded.vocab_size) == (0, 77, 49408)
    assert torch.equal(loaded(PROMPTS[:100]), sd2(PROMPTS[:100]))
    via_files = CLIPTokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", pad_token="!")
    assert torch.equal(via_files(PROMPTS[:100]), sd2(PROMPTS[:100]))


def test_from_folder_reads_transformers_5_tokenizer_json(hf_sd2, sd2, tmp_path):
    """transformers 5 saves only tokenizer.json (no vocab.json / merges.txt)."""
    hf_sd2.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    loaded = CLIPTokenizer.from_folder(tmp_path)
    assert loaded.pad_token_id == 0 and loaded.max_length == 77
    assert torch.equal(loaded(PROMPTS[:100]), sd2(PROMPTS[:100]))


def test_from_folder_special_tokens_map_overrides_config(sd1, tmp_path):
    sd1.save(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    assert CLIPTokenizer.from_folder(tmp_path).pad_token_id == 0


def test_bad_input(sd1, tmp_path):
    with pytest.raises(InvalidInputError):
        sd1(123)
    with pytest.raises(InvalidInputError):
        sd1(["ok", None])
    with pytest.raises(InvalidInputError, match="pad_token"):
        CLIPTokenizer.default(pad_token="<pad>")
    with pytest.raises(CheckpointError, match="not a tokenizer folder"):
        CLIPTokenizer.from_folder(tmp_path)
