"""Round trips that must lose nothing: the built-in model through a single file, `sdtorch convert` onto
an existing destination, and `python -m sdtorch`."""

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
def test_the_models_default_cfg_travels_with_it(built_in, tmp_path, format):
    assert built_in.default_cfg_scale == 4.0  # from the shipped folder's model_index.json
    copy = sdtorch.load(sdtorch.save(built_in, tmp_path / "a.safetensors", format=format))
    assert copy.default_cfg_scale == 4.0
    copy.default_cfg_scale = 7.5  # SD's: nothing is written, and a reload gets 7.5 again
    again = sdtorch.load(sdtorch.save(copy, tmp_path / "b.safetensors", format=format))
    assert again.default_cfg_scale == 7.5


def test_a_folder_whose_scheduler_says_trailing_defaults_to_sgm_uniform(built_in, tmp_path):
    """Few-step distilled models (SDXL Turbo, Lightning) ship a scheduler with trailing timesteps: a request
    without a scheduler uses them (A1111's "SGM Uniform"); one that names a scheduler gets it; saving keeps it."""
    folder = sdtorch.save(built_in, tmp_path / "turbo", format="diffusers")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(config_file.read_text().replace('"leading"', '"trailing"'))
    turbo = sdtorch.load(folder)
    assert turbo.default_schedule == "SGM Uniform" and built_in.default_schedule is None
    settings = dict(steps=2, seed=3, sampler_name="Euler")
    (default,), (sgm,), (karras,) = (turbo("a red circle", **settings, **extra)
                                     for extra in ({}, {"scheduler": "SGM Uniform"}, {"scheduler": "Karras"}))
    assert np.array_equal(np.asarray(default), np.asarray(sgm))
    assert not np.array_equal(np.asarray(default), np.asarray(karras))
    assert "Schedule type: SGM Uniform" in default.info["parameters"]
    again = sdtorch.load(sdtorch.save(turbo, tmp_path / "again", format="diffusers"))
    assert again.default_schedule == "SGM Uniform"


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


@pytest.mark.parametrize("value", ["abc", -1, float("nan"), True])
def test_a_bad_default_cfg_in_model_index_is_a_clear_error(built_in, tmp_path, value):
    import json

    folder = sdtorch.save(built_in, tmp_path / "model", format="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_sdtorch_cfg_scale": value}))
    with pytest.raises(sdtorch.errors.ArchitectureError, match="model_index.json.*sdtorch_cfg_scale"):
        sdtorch.load(folder)
