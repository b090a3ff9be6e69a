"""Textual-inversion training: only the new vectors train, A1111 initialisation, the three output formats load
back (in sdtorch and in diffusers), exact resume, strict config."""

import json
import random

import pytest
import torch
from conftest import assert_parity

import sdtorch
from sdtorch.adapters.embeddings import add_trainable_embedding, init_vectors, read_embedding
from sdtorch.data.shapes import caption, render, sample_attributes
from sdtorch.errors import InvalidInputError
from sdtorch.prompts import encode_prompts
from sdtorch.training import textual_inversion as ti
from sdtorch.training.datasets import DatasetConfig, FineTuneDataset
from sdtorch.training.textual_inversion import FORMATS, TextualInversionConfig, train_textual_inversion

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "myshape"
PROMPT = f"a photo of a {NAME} on grass"


def image_folder(folder, count: int = 4):
    """`count` rendered 64x64 shapes with caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        attrs = sample_attributes(rng)
        render(attrs, size=64).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption(attrs, rng))
    return folder


def config(**overrides) -> TextualInversionConfig:
    settings = dict(name=NAME, init_word="red circle", num_vectors=3, steps=3, batch_size=2, lr=0.05,
                    templates=("a photo of a [name]", "[filewords], [name] style"), checkpoint_every=100)
    return TextualInversionConfig(**{**settings, **overrides})


def dataset(folder) -> FineTuneDataset:
    return FineTuneDataset(DatasetConfig(folder=str(folder), resolution=64, seed=1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ti") / "images")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """One short run: (pipeline after it, state dicts before it, the initial vectors, the output folder)."""
    pipe = sdtorch.load()
    before = {part: {k: v.clone() for k, v in getattr(pipe, part).state_dict().items()}
              for part in ("unet", "vae", "text_encoder")}
    start = init_vectors(pipe.tokenizer, pipe.text_encoder, "red circle", 3)
    out = tmp_path_factory.mktemp("ti") / "out"
    assert train_textual_inversion(pipe, dataset(data), config(), out) == out / f"{NAME}.safetensors"
    return pipe, before, start, out


def test_only_the_new_vectors_change(trained):
    pipe, before, start, out = trained
    for part, weights in before.items():
        module = getattr(pipe, part)
        assert not any(p.requires_grad for p in module.parameters()), part
        after = module.state_dict()
        assert after.keys() == weights.keys()
        assert all(torch.equal(after[k], v) for k, v in weights.items()), f"{part} changed"
    assert pipe.embeddings == {}  # the trainable embedding is unloaded at the end
    vectors = read_embedding(out / f"{NAME}.safetensors").vectors
    assert vectors.shape == start.shape == (3, 128)
    assert (vectors - start).abs().amax(dim=1).gt(0).all()  # every vector trained


def test_init_vectors_spread_the_init_words_tokens_as_a1111():
    pipe = sdtorch.load()
    table = pipe.text_encoder.embeddings.token_embedding.weight
    red, circle = pipe.tokenizer.encode("red circle")
    vecs = init_vectors(pipe.tokenizer, pipe.text_encoder, "red circle", 5)
    assert torch.equal(vecs, table[[red, red, red, circle, circle]])  # vector i: token floor(i * 2 / 5)
    assert torch.equal(init_vectors(pipe.tokenizer, pipe.text_encoder, "red circle", 1), table[[red]])


def test_saved_files_load_back_in_every_format(trained):
    pipe, _, start, out = trained
    trained_vectors = read_embedding(out / f"{NAME}.safetensors").vectors
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        [f"{NAME}.pt", f"{NAME}.safetensors", "learned_embeds.safetensors"])
    raw = torch.load(out / f"{NAME}.pt", weights_only=True)
    assert raw["name"] == NAME and raw["step"] == 3 and raw["sd_checkpoint_name"] == "shapes"
    assert set(raw) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    encodings = []
    with torch.no_grad():
        for file in FORMATS.values():
            path = out / file.format(NAME)
            assert pipe.load_embedding(path) == NAME  # A1111: the stem; diffusers: the token
            assert torch.equal(pipe.text_encoder.textual_inversion.vectors, trained_vectors)
            encodings.append(encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT]))
            pipe.unload_embedding()
        add_trainable_embedding(pipe.tokenizer, pipe.text_encoder, NAME, start)
        initial = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT])
        pipe.unload_embedding()
    assert all(torch.equal(e, encodings[0]) for e in encodings)
    assert not torch.allclose(encodings[0], initial)


@pytest.mark.parametrize("kind", ["diffusers", "a1111_pt", "a1111_safetensors"])
def test_diffusers_load_textual_inversion_reads_the_files(trained, kind):
    import diffusers

    pipe, _, _, out = trained
    path = out / FORMATS[kind].format(NAME)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        pipe.report.source, safety_checker=None, requires_safety_checker=False)
    reference.load_textual_inversion(str(path), token=NAME)
    pipe.load_embedding(path)
    try:
        with torch.no_grad():
            theirs = reference.encode_prompt(PROMPT, "cpu", 1, False)[0]
            ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT])
    finally:
        pipe.unload_embedding()
    assert_parity(ours, theirs)


def test_resume_is_bit_identical(tmp_path, data, monkeypatch):
    settings = dict(steps=4, checkpoint_every=2)
    straight = train_textual_inversion(sdtorch.load(), dataset(data), config(**settings), tmp_path / "straight")

    calls, real_loss = [], ti.diffusion_loss

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and interrupt:  # the third step, after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ti, "diffusion_loss", counted)
    pipe, interrupt = sdtorch.load(), True
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(pipe, dataset(data), config(**settings), tmp_path / "resumed")
    assert pipe.embeddings == {} and not (tmp_path / "resumed" / f"{NAME}.safetensors").exists()
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    calls.clear()
    interrupt = False
    resumed = train_textual_inversion(sdtorch.load(), dataset(data), config(**settings), tmp_path / "resumed")
    assert len(calls) == 2  # steps 3 and 4 only
    assert torch.equal(read_embedding(resumed).vectors, read_embedding(straight).vectors)
    with pytest.raises(InvalidInputError, match="exist already"):  # never replaces its outputs
        train_textual_inversion(sdtorch.load(), dataset(data), config(**settings), tmp_path / "resumed")


def test_config_from_table_rejects_unknown_keys_and_bad_values():
    table = {"name": NAME, "init_word": "circle", "num_vectors": 2, "templates": ["a [name]"]}
    assert TextualInversionConfig.from_table(table).templates == ("a [name]",)
    with pytest.raises(InvalidInputError, match="learning_rate: unknown key"):
        TextualInversionConfig.from_table({**table, "learning_rate": 0.1})
    with pytest.raises(InvalidInputError, match="num_vectors"):
        TextualInversionConfig.from_table({**table, "num_vectors": 0})
    with pytest.raises(InvalidInputError, match="neither"):
        TextualInversionConfig.from_table({**table, "templates": ["a photo"]})
    with pytest.raises(InvalidInputError, match="name"):
        TextualInversionConfig.from_table({**table, "name": "../evil"})
    with pytest.raises(InvalidInputError, match="formats"):
        TextualInversionConfig.from_table({**table, "formats": ["ckpt"]})


def test_init_word_without_tokens_is_a_clear_error(tmp_path, data):
    with pytest.raises(InvalidInputError, match="init text '  ' has no tokens"):
        train_textual_inversion(sdtorch.load(), dataset(data), config(init_word="  "), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
