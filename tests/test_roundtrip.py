"""Round trips that must lose nothing: the built-in model through a single file, `sdtorch convert` onto
an existing destination, and `python -m sdtorch`."""

import dataclasses
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sdtorch
from sdtorch.checkpoints.io import read_safetensors
from sdtorch.checkpoints.loading import DEFAULT_MODEL, TOKENIZER_METADATA_KEY
from sdtorch.cli import main
from sdtorch.errors import CheckpointError
from sdtorch.request import FEW_STEP_DEFAULTS, ModelDefaults


@pytest.fixture(scope="module")
def built_in():
    return sdtorch.load()


def test_built_in_model_generates_the_same_pixels_from_a_single_file(built_in, tmp_path):
    path = sdtorch.save(built_in, tmp_path / "shapes.safetensors", format="single_file")
    copy = sdtorch.load(path)
    assert copy.tokenizer.vocab_size == built_in.tokenizer.vocab_size == 678  # its own BPE, not CLIP's 49,408
    assert copy.tokenizer.to_dict() == built_in.tokenizer.to_dict()
    settings = {"num_inference_steps": 4, "seed": 1}  # and the model's own CFG, which travels with it
    (ours,), (reference,) = copy("a red circle", **settings), built_in("a red circle", **settings)
    assert np.array_equal(np.asarray(ours), np.asarray(reference))
    assert "CFG scale: 4," in ours.info["parameters"]


@pytest.mark.parametrize("format", ["single_file", "diffusers"])
def test_the_models_defaults_travel_with_it(built_in, tmp_path, format):
    assert built_in.defaults == ModelDefaults(cfg_scale=4.0)  # from the shipped folder's model_index.json
    copy = sdtorch.load(sdtorch.save(built_in, tmp_path / "a.safetensors", format=format))
    assert copy.defaults == ModelDefaults(cfg_scale=4.0)
    copy.defaults = FEW_STEP_DEFAULTS
    again = sdtorch.load(sdtorch.save(copy, tmp_path / "b.safetensors", format=format))
    assert again.defaults == FEW_STEP_DEFAULTS
    again.defaults = ModelDefaults()  # SD's: nothing is written, and a reload gets them again
    plain = sdtorch.save(again, tmp_path / "c.safetensors", format=format)
    assert sdtorch.load(plain).defaults == ModelDefaults()
    assert "sdtorch_defaults" not in (read_safetensors(plain)[1] if format == "single_file"
                                      else (plain / "model_index.json").read_text())


@pytest.mark.parametrize("spacing, zero_snr, scheduler_class, expected", [
    ("trailing", False, "EulerAncestralDiscreteScheduler", FEW_STEP_DEFAULTS),  # SDXL Turbo
    ("trailing", False, "EulerDiscreteScheduler", dataclasses.replace(FEW_STEP_DEFAULTS, sampler_name="Euler")),
    ("trailing", True, "DDIMScheduler", ModelDefaults()),  # zero terminal SNR: ordinary steps and CFG
    ("leading", False, "EulerDiscreteScheduler", ModelDefaults()),
])
def test_a_folder_whose_scheduler_says_trailing_gets_few_step_defaults(built_in, tmp_path, spacing, zero_snr,
                                                                       scheduler_class, expected):
    """Few-step distilled models (SDXL Turbo, Lightning) ship a scheduler with trailing timesteps: a request that
    leaves steps, sampler, schedule and CFG unset gets 4 steps of Euler (a) on A1111's "SGM Uniform", no guidance."""
    import json

    folder = sdtorch.save(built_in, tmp_path / "turbo", format="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    del index["_sdtorch_defaults"]  # the shapes model's CFG 4 would win
    (folder / "model_index.json").write_text(json.dumps(index))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(timestep_spacing=spacing, rescale_betas_zero_snr=zero_snr, _class_name=scheduler_class)
    config_file.write_text(json.dumps(config))
    model = sdtorch.load(folder)
    assert model.defaults == expected
    if expected != FEW_STEP_DEFAULTS:
        return
    (default,), (spelled,), (karras,) = (model("a red circle", seed=3, **extra) for extra in (
        {}, dict(steps=4, sampler_name="Euler a", scheduler="SGM Uniform", cfg_scale=1),
        {"scheduler": "Karras"}))
    assert np.array_equal(np.asarray(default), np.asarray(spelled))
    assert not np.array_equal(np.asarray(default), np.asarray(karras))
    for text in ("Steps: 4,", "Sampler: Euler a,", "Schedule type: SGM Uniform", "CFG scale: 1,"):
        assert text in default.info["parameters"]
    again = sdtorch.load(sdtorch.save(model, tmp_path / "again", format="diffusers"))
    assert again.defaults == FEW_STEP_DEFAULTS


def test_broken_tokenizer_metadata_is_a_clear_error(built_in, tmp_path):
    path = sdtorch.save(built_in, tmp_path / "shapes.safetensors", format="single_file")
    tensors, metadata = read_safetensors(path)
    for broken, message in (("{not json", "not valid JSON"), ('{"vocab": {}}', "incomplete or malformed")):
        save_file(tensors, str(path), metadata={**metadata, TOKENIZER_METADATA_KEY: broken})
        with pytest.raises(CheckpointError, match=message):
            sdtorch.load(path)


def fingerprint(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) -> sha256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def convert(destination: Path, to: str, *options: str) -> int:
    return main(["convert", str(DEFAULT_MODEL), str(destination), "--to", to, *options])


def test_convert_few_step_records_the_few_step_defaults(tmp_path, capsys):
    """A single file cannot say it is a Turbo / Lightning model: `--few-step` says it, and convert records it."""
    assert convert(tmp_path / "turbo.safetensors", "single-file", "--few-step") == 0
    assert sdtorch.load(tmp_path / "turbo.safetensors").defaults == FEW_STEP_DEFAULTS
    assert main(["info", str(tmp_path / "turbo.safetensors")]) == 0
    assert "defaults:        steps 4, sampler_name Euler a, scheduler SGM Uniform, cfg_scale 1.0" in capsys.readouterr().out


def test_convert_to_a_folder_never_loses_data(tmp_path, capsys):
    dst = tmp_path / "copy"
    assert convert(dst, "diffusers") == 0
    first = fingerprint(dst)
    assert convert(dst, "diffusers") == 2
    err = capsys.readouterr().err
    assert f"{dst} already exists" in err and "--overwrite" in err
    assert fingerprint(dst) == first
    assert convert(dst, "diffusers", "--overwrite") == 0  # a diffusers model is replaced when asked
    assert fingerprint(dst) == first
    (dst / "my notes.txt").write_text("mine")
    assert convert(dst, "diffusers", "--overwrite") == 2  # a folder holding anything else never is
    assert "my notes.txt" in capsys.readouterr().err
    assert (dst / "my notes.txt").read_text() == "mine" and (dst / "unet").is_dir()
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"a photo")
    assert convert(photos, "diffusers", "--overwrite") == 2
    assert "no model_index.json" in capsys.readouterr().err and (photos / "cat.jpg").read_bytes() == b"a photo"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_convert_to_a_file_never_loses_data(tmp_path, capsys):
    dst = tmp_path / "shapes.safetensors"
    assert convert(dst, "single-file") == 0
    first = dst.read_bytes()
    assert convert(dst, "single-file") == 2
    assert f"{dst} already exists" in capsys.readouterr().err and dst.read_bytes() == first
    tensors, metadata = read_safetensors(dst)
    assert convert(dst, "single-file", "--overwrite") == 0  # a checkpoint is replaced when asked
    again, again_metadata = read_safetensors(dst)  # (the header's key order varies from write to write)
    assert again_metadata == metadata and again.keys() == tensors.keys()
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    notes, archive, folder = tmp_path / "notes.safetensors", tmp_path / "archive.ckpt", tmp_path / "folder"
    notes.write_text("not a checkpoint")
    with zipfile.ZipFile(archive, "w") as z:  # a zip like torch.save's, but of something else
        z.writestr("holiday/photo.jpg", b"a photo")
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"a photo")
    for other in (notes, archive, folder):
        before = fingerprint(other)
        assert convert(other, "single-file", "--overwrite") == 2
        assert str(other) in capsys.readouterr().err
        assert fingerprint(other) == before


def test_python_m_sdtorch_is_the_sdtorch_command():
    run = [sys.executable, "-m", "sdtorch", "info"]
    result = subprocess.run([*run, str(DEFAULT_MODEL)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "kind:" in result.stdout
    missing = subprocess.run([*run, "/no/such/model"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.parametrize("value, message", [
    ({"cfg_scale": "abc"}, "cfg_scale"), ({"cfg_scale": float("nan")}, "cfg_scale"), ({"steps": 0}, "steps"),
    ({"sampler_name": "Euler z"}, "sampler_name"), ({"cfg": 4}, "unknown model default 'cfg'"), (4.0, "JSON object"),
])
def test_bad_defaults_in_model_index_are_a_clear_error(built_in, tmp_path, value, message):
    import json

    folder = sdtorch.save(built_in, tmp_path / "model", format="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_sdtorch_defaults": value}))
    with pytest.raises(sdtorch.errors.ArchitectureError, match=f"model_index.json.*{message}"):
        sdtorch.load(folder)
