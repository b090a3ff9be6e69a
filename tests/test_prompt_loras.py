"""`<lora:name:weight>` in a prompt applies a LoRA from the LoRA folder for that generation only, as A1111 does,
and the infotext records it (the tag in the prompt, "Lora hashes"); through the Python API and the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import sdtorch
from sdtorch.adapters.lora import lora_hash
from sdtorch.cli import main
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext, read_infotext

SETTINGS = dict(steps=3, seed=4)


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load()  # the built-in model: 64 px, fast


@pytest.fixture
def lora_dir(pipe, tmp_path):
    """A folder with one kohya LoRA on the UNet's attention projections (random weights, large enough to show)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for path, m in pipe.unet.named_modules():
        if isinstance(m, nn.Linear) and path.endswith(("to_q", "to_k", "to_v")):
            name = "lora_unet_" + path.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g)
            tensors[f"{name}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g)
            tensors[f"{name}.alpha"] = torch.tensor(4.0)
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    save_file(tensors, str(folder / "styles" / "ink.safetensors"))
    return folder


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_a_prompt_tag_applies_the_lora_for_that_run_only(pipe, lora_dir):
    pipe.lora_dir = lora_dir
    try:
        plain = pipe("a red circle", **SETTINGS)[0]
        tagged = pipe("a red circle <lora:ink:0.8>", **SETTINGS)[0]
        by_hand_name = pipe.load_lora(lora_dir / "styles" / "ink.safetensors", scale=0.8)
        by_hand = pipe("a red circle", **SETTINGS)[0]
        pipe.unload_lora(by_hand_name)
        after = pipe("a red circle", **SETTINGS)[0]
    finally:
        pipe.lora_dir = None
    assert not np.array_equal(pixels(tagged), pixels(plain))
    assert np.array_equal(pixels(tagged), pixels(by_hand))  # the tag is the LoRA at that weight; text unchanged
    assert np.array_equal(pixels(after), pixels(plain)) and pipe.loras == {}  # nothing stays applied
    text = tagged.info["parameters"]
    assert parse_infotext(text).request.prompt == "a red circle <lora:ink:0.8>"
    assert parse_infotext(text).extra["Lora hashes"] == f"ink: {lora_hash(lora_dir / 'styles' / 'ink.safetensors')}"


def test_bad_tags_are_clear_errors(pipe, lora_dir):
    with pytest.raises(InvalidInputError, match="no LoRA folder"):
        pipe("a red circle <lora:ink:0.8>", **SETTINGS)
    pipe.lora_dir = lora_dir
    try:
        for prompt, phrase in [("x <lora:inc>", "did you mean 'ink'"), ("x <lora:../loras/styles/ink>", "not in"),
                               ("x <lora:ink:lots>", "not a number"), ("x <lora:ink:1:0.5>", "one weight")]:
            with pytest.raises(InvalidInputError, match=phrase):
                pipe(prompt, **SETTINGS)
        with pytest.raises(InvalidInputError, match="two weights"):
            pipe(["x <lora:ink:1>", "y <lora:ink:0.5>"], **SETTINGS)
        result = pipe("x <hypernet:h:1>", **SETTINGS)
        assert result.warnings == ["<hypernet:h> ignored: sdtorch applies only <lora:...> tags"]
    finally:
        pipe.lora_dir = None


def test_the_cli_takes_a_lora_folder(lora_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle <lora:ink:0.8>", "--lora-dir", str(lora_dir), "--steps", "3", "--seed", "4",
                 "--out", str(out), "--quiet"]) == 0
    assert "Lora hashes" in read_infotext(out)
    assert main(["generate", "a red circle <lora:ink>", "--steps", "3", "--out", str(tmp_path / "b.png")]) == 2
    assert "no LoRA folder" in capsys.readouterr().err
    assert main(["generate", "x", "--lora-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "c.png")]) == 2
    assert "--lora-dir" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


def test_the_cli_takes_an_embeddings_folder(pipe, tmp_path, capsys):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    width = pipe.config.text_encoder.width
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(1))},
              str(folder / "glowy.safetensors"))
    save_file({"emb_params": torch.randn(2, width + 1)}, str(folder / "wrong.safetensors"))
    outs = [tmp_path / "plain.png", tmp_path / "embedded.png"]
    base = ["generate", "a glowy red circle", "--steps", "3", "--seed", "2", "--quiet", "--out"]
    assert main([*base, str(outs[0])]) == 0
    assert main([*base, str(outs[1]), "--embeddings-dir", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "embedding not loaded" in err and "wrong.safetensors" in err  # said, not silently skipped
    assert not np.array_equal(pixels(Image.open(outs[0])), pixels(Image.open(outs[1])))
