"""Textual-inversion training: only the new vectors train, A1111 initialisation, the three output formats load
back (in sdtorch and in diffusers), exact resume, strict config, `sdtorch finetune --method textual-inversion`."""

import json
import random

import pytest
import torch
from conftest import assert_parity

import sdtorch
from sdtorch import cli, tomlconfig
from sdtorch.adapters.embeddings import add_trainable_embedding, init_vectors, read_embedding
from sdtorch.data.shapes import caption, render, sample_attributes
from sdtorch.errors import InvalidInputError
from sdtorch.prompts import encode_prompts
from sdtorch.training import textual_inversion as ti
from sdtorch.training.datasets import DatasetConfig, FineTuneDataset
from sdtorch.training.finetune import FineTuneConfig, finetune
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


def config(data, out, **overrides) -> FineTuneConfig:
    """A textual-inversion run on `data` into `out`; overrides name fields of either config."""
    own = dict(name=NAME, init_word="red circle", num_vectors=3,
               templates=("a photo of a [name]", "[filewords], [name] style"))
    shared = dict(steps=3, batch_size=2, lr=0.05, checkpoint_every=100)
    for key, value in overrides.items():
        (own if key in own else shared)[key] = value
    return FineTuneConfig(dataset=DatasetConfig(folder=str(data), resolution=64, seed=1), out=str(out),
                          method="textual-inversion", textual_inversion=TextualInversionConfig(**own), **shared)


def train(pipe, data, out, **overrides):
    settings = config(data, out, **overrides)
    return train_textual_inversion(pipe, FineTuneDataset(settings.dataset), settings)


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
    assert train(pipe, data, out) == out / f"{NAME}.safetensors"
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
    straight = train(sdtorch.load(), data, tmp_path / "straight", **settings)

    calls, real_loss = [], ti.diffusion_loss

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and interrupt:  # the third step, after the checkpoint at step 2
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(ti, "diffusion_loss", counted)
    pipe, interrupt = sdtorch.load(), True
    with pytest.raises(KeyboardInterrupt):
        train(pipe, data, tmp_path / "resumed", **settings)
    assert pipe.embeddings == {} and not (tmp_path / "resumed" / f"{NAME}.safetensors").exists()
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "checkpoint.json").read_text())["step"] == 2
    calls.clear()
    interrupt = False
    resumed = train(sdtorch.load(), data, tmp_path / "resumed", **settings)
    assert len(calls) == 2  # steps 3 and 4 only
    assert torch.equal(read_embedding(resumed).vectors, read_embedding(straight).vectors)
    with pytest.raises(InvalidInputError, match="exist already"):  # never replaces its outputs
        train(sdtorch.load(), data, tmp_path / "resumed", **settings)


def test_config_from_table_rejects_unknown_keys_and_bad_values():
    section = {"name": NAME, "init_word": "circle", "num_vectors": 2, "templates": ["a [name]"]}

    def parse(section=section, **top):
        table = {"dataset": {"folder": "data"}, "out": "out", "method": "textual-inversion",
                 "textual_inversion": section, **top}
        return tomlconfig.from_table(FineTuneConfig, table, source="ti.toml")

    assert parse().textual_inversion.templates == ("a [name]",)
    with pytest.raises(InvalidInputError, match=r"\[textual_inversion\] learning_rate: unknown key"):
        parse({**section, "learning_rate": 0.1})  # a shared setting belongs at the top level, as lr
    with pytest.raises(InvalidInputError, match="num_vectors"):
        parse({**section, "num_vectors": 0})
    with pytest.raises(InvalidInputError, match="neither"):
        parse({**section, "templates": ["a photo"]})
    with pytest.raises(InvalidInputError, match="name"):
        parse({**section, "name": "../evil"})
    with pytest.raises(InvalidInputError, match="formats"):
        parse({**section, "formats": ["ckpt"]})
    with pytest.raises(InvalidInputError, match=r"textual-inversion needs the \[textual_inversion\] section"):
        tomlconfig.from_table(FineTuneConfig, {"dataset": {"folder": "data"}, "out": "out",
                                               "method": "textual-inversion"}, source="ti.toml")
    with pytest.raises(InvalidInputError, match=r"\[textual_inversion\] is for method textual-inversion, not lora"):
        parse(method="lora")
    with pytest.raises(InvalidInputError, match="textual-inversion does not use rank, ema_decay"):
        parse(rank=8, ema_decay=0.9)


def test_toml_misspelt_key_in_the_section_is_refused_by_name(tmp_path, data, capsys):
    path = tmp_path / "ti.toml"
    path.write_text(f'out = "{tmp_path / "out"}"\nmethod = "textual-inversion"\n[dataset]\nfolder = "{data}"\n'
                    f'[textual_inversion]\nname = "{NAME}"\ninit_word = "circle"\nnum_vector = 2\n')
    assert cli.main(["finetune", str(path)]) == 2
    assert f"{path}: [textual_inversion] num_vector: unknown key; did you mean num_vectors?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_cli_run_writes_the_three_files(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert cli.main(["finetune", "--method", "textual-inversion", "--data", str(data), "--out", str(out),
                     "--resolution", "64", "--token", "hexa", "--init-word", "circle", "--num-vectors", "2",
                     "--steps", "2", "--lr", "5e-3", "--weight-decay", "0", "--no-progress"]) == 0
    files = {kind: out / name.format("hexa") for kind, name in FORMATS.items()}
    assert capsys.readouterr().out.strip() == str(files["a1111_safetensors"])
    assert {p.name for p in out.iterdir() if p.is_file()} >= {p.name for p in files.values()}
    assert torch.load(files["a1111_pt"], weights_only=True)["step"] == 2
    assert all(read_embedding(path).vectors.shape == (2, 128) for path in files.values())
    settings = json.loads((out / "checkpoint" / "checkpoint.json").read_text())["config"]
    assert settings["lr"] == 5e-3 and settings["weight_decay"] == 0
    assert settings["textual_inversion"]["name"] == "hexa"


def test_init_word_without_tokens_is_a_clear_error(tmp_path, data):
    with pytest.raises(InvalidInputError, match="init text '  ' has no tokens"):
        train(sdtorch.load(), data, tmp_path / "out", init_word="  ")
    assert not (tmp_path / "out").exists()  # nothing written
