"""The shipped default model (src/sdtorch/assets/shapes): it loads, diffusers agrees with it, and the
judge finds that its pictures show what their prompts ask for."""

import json

import pytest
import torch
from PIL import Image
from conftest import diffusers_pipe, psnr

import sdtorch
from sdtorch.checkpoints.loading import DEFAULT_MODEL
from sdtorch.evaluation.generation import eval_prompts, generate_and_score
from sdtorch.evaluation.judge import load_judge

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_MEGABYTES = 40


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load()


def test_default_model_is_the_shipped_shapes_model(pipe):
    assert pipe.report.source == str(DEFAULT_MODEL) and pipe.model_name == "shapes"
    assert pipe.default_size == 64 and pipe.vae_scale_factor == 8
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= MAX_MEGABYTES * 2**20


def test_diffusers_draws_the_same_picture(pipe):
    prompt = "a small red star in the top left"
    ref = diffusers_pipe(DEFAULT_MODEL, "txt2img", "DPM++ 2M", "Karras")
    theirs = ref(prompt, height=64, width=64, num_inference_steps=20, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(3)).images[0]
    ours = pipe(prompt, num_inference_steps=20, guidance_scale=7.5, sampler="DPM++ 2M", schedule="Karras",
                generator=torch.Generator().manual_seed(3))[0]
    assert psnr(ours, theirs) >= 40


def test_judge_finds_the_prompted_attributes(pipe):
    # the bars sit below the shipped model's `sdtorch eval --cfg 4` figures (docs/shapes-model/eval.json; on these
    # 40 prompts: shape 90%, colour 100%, held-in and held-out all correct 90%) and far above chance (shape 1/6,
    # colour 1/8, size 1/2, position 1/9)
    results = generate_and_score(pipe, eval_prompts(30, 10, seed=1), load_judge(), seed=1, guidance_scale=4.0)
    accuracy = results["all"]["accuracy"]
    assert accuracy["size"] >= 0.9 and accuracy["position"] >= 0.9, accuracy
    assert accuracy["shape"] >= 0.75 and accuracy["colour"] >= 0.85, accuracy
    assert results["held_in"]["all_correct"] >= 0.7, results["held_in"]
    assert results["held_out"]["all_correct"] >= 0.5, results["held_out"]


def test_cli_generate_and_eval_use_the_default_model(tmp_path, capsys):
    from sdtorch.cli import main

    out = tmp_path / "star.png"
    assert main(["generate", "a small red star in the top left", "--seed", "0", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    assert "CFG scale: 4," in Image.open(out).info["parameters"]  # the built-in model's own default guidance

    report = tmp_path / "eval.json"
    assert main(["eval", "--prompts", "4", "--held-out", "2", "--no-compare", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "4 held-in + 2 held-out prompts" in table and "all correct" in table
    written = json.loads(report.read_text())
    assert written["guided"]["all"]["n"] == 6 and written["settings"]["guidance_scale"] == 4.0


def test_a_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    from sdtorch.checkpoints import loading
    from sdtorch.errors import CheckpointError

    monkeypatch.setattr(loading, "DEFAULT_MODEL", tmp_path / "gone")
    with pytest.raises(CheckpointError, match="default model is missing"):
        sdtorch.load()


def test_shipped_tokenizer_agrees_with_transformers(pipe):
    import transformers

    from sdtorch.data.shapes import ShapesDataset

    hf = transformers.CLIPTokenizer.from_pretrained(DEFAULT_MODEL / "tokenizer")
    texts = [ShapesDataset(50, seed=5).describe(i)[1] for i in range(50)] + ["A HEXAGON, unseen words & punctuation!"]
    assert pipe.tokenizer(texts).tolist() == hf(texts, padding="max_length", max_length=77, truncation=True).input_ids
