"""`sdtorch finetune`: LoRA on the built-in shapes model, its kohya / diffusers exports, exact resume,
multi-process parity (accelerate launch, gloo on CPU) and the errors a user can cause."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_parity
from PIL import Image

import sdtorch
from sdtorch.adapters.lora import lora_hash
from sdtorch.checkpoints.io import read_safetensors, read_safetensors_header
from sdtorch.errors import CheckpointError, InvalidInputError
from sdtorch.training.datasets import DatasetConfig
from sdtorch.training.finetune import FineTuneConfig, finetune
from sdtorch.training.lora_training import PEFT_FILE, tensor_data_hash

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def make_data(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (60 * i, 200 - 40 * i, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {['red', 'green', 'blue', 'white'][i % 4]} circle")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("ft") / "data")


def config(data: Path, out: Path, **kw) -> FineTuneConfig:
    base = dict(steps=3, batch_size=2, lr=1e-2, rank=4, alpha=2.0, checkpoint_every=2, log_every=1, progress=False)
    return FineTuneConfig(dataset=DatasetConfig(folder=str(data), resolution=64), out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 3-step LoRA run (attention + ff + proj, text encoder too) and the base weights before it."""
    out = tmp_path_factory.mktemp("ft") / "out"
    pipe = sdtorch.load()
    before = {k: v.clone() for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    mp = pytest.MonkeyPatch()
    mp.setattr(sdtorch, "load", lambda source=None, device=None: pipe)
    try:
        result = finetune(config(data, out, lora_targets="transformer", train_text_encoder=True))
    finally:
        mp.undo()
    return pipe, before, out, result


def test_lora_changes_only_lora_weights(trained):
    pipe, before, out, result = trained
    after = {k: v for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tensors, meta = read_safetensors(result)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert any(k.startswith("lora_te_") for k in tensors) and all(torch.isfinite(v).all() for v in tensors.values())
    assert any(v.abs().max() > 0 for v in ups)  # up starts at zero: training moved it
    log = [json.loads(line) for line in (out / "checkpoint" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(0 < e["loss"] < 10 for e in log)
    assert (out / "loss.png").is_file()


def test_kohya_metadata_and_hash(trained):
    _, _, out, result = trained
    _, meta, _ = read_safetensors_header(result)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_steps"] == "3" and meta["ss_num_train_images"] == "4"
    assert meta["ss_output_name"] == "lora" and float(meta["ss_learning_rate"]) == 1e-2
    assert float(meta["ss_training_started_at"]) > 0
    tensors, _ = read_safetensors(result)
    assert meta["sshs_model_hash"] == tensor_data_hash(tensors)
    data = result.read_bytes()
    import hashlib

    assert hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest() == meta["sshs_model_hash"]
    assert lora_hash(result) == meta["sshs_model_hash"][:12]


def test_exports_match_diffusers(trained, tmp_path):
    """Both exported files, loaded by sdtorch and by diffusers' load_lora_weights, give the same UNet output."""
    import diffusers
    import peft  # noqa: F401  (diffusers needs it for LoRA)

    _, _, out, result = trained
    folder = tmp_path / "base"
    sdtorch.save(sdtorch.load(), folder, format="diffusers")
    pipe = sdtorch.load(folder)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    ids = pipe.tokenizer(["a red circle", ""])
    with torch.no_grad():
        context = pipe.text_encoder(ids)
        base = pipe.unet(x, t, context)
    for file in (result, out / PEFT_FILE):
        name = pipe.load_lora(file)
        with torch.no_grad():
            ours, ours_text = pipe.unet(x, t, pipe.text_encoder(ids)), pipe.text_encoder(ids)
            ours_fixed = pipe.unet(x, t, context)
        pipe.unload_lora(name)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                requires_safety_checker=False)
        ref.load_lora_weights(str(file))
        with torch.no_grad():
            theirs_text = ref.text_encoder(ids).last_hidden_state
            theirs = ref.unet(x, t, encoder_hidden_states=context).sample
        assert (ours_fixed - base).abs().max() > 1e-4  # the LoRA changes the output
        assert_parity(ours_fixed, theirs, rel=1e-4)
        assert_parity(ours_text, theirs_text, rel=1e-4)
        assert torch.isfinite(ours).all()


def test_exact_resume(data, tmp_path):
    """2 steps, then the same command with steps=4, equals 4 uninterrupted steps bit for bit (EMA included)."""
    kw = dict(steps=4, checkpoint_every=2, ema_decay=0.9, keep_last=1)
    finetune(config(data, tmp_path / "a", **kw))
    finetune(config(data, tmp_path / "b", **{**kw, "steps": 2}))
    finetune(config(data, tmp_path / "b", **kw))
    a, _ = read_safetensors(tmp_path / "a" / "lora.safetensors")
    b, _ = read_safetensors(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "a").glob("lora-step*")) == ["lora-step00000002.safetensors"]
    with pytest.raises(InvalidInputError, match="different training config.*lr"):
        finetune(config(data, tmp_path / "b", **{**kw, "lr": 1e-3}))


def test_two_processes_match_one(data, tmp_path):
    """`accelerate launch --num_processes 2` (gloo on CPU), global batch 2, logs the losses of one process."""
    def run(out: Path, launcher: list[str]) -> list[float]:
        args = ["-m", "sdtorch", "finetune", "--data", str(data), "--resolution", "64", "--out", str(out),
                "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--log-every", "1", "--no-progress"]
        # accelerate's `--cpu` runs one process; MULTI_CPU (gloo) takes a multi-process launch + ACCELERATE_USE_CPU
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
               "PYTHONPATH": str(Path(sdtorch.__file__).parents[1])}
        done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=280)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line)["loss"] for line in (out / "checkpoint" / "log.jsonl").read_text().splitlines()]

    one = run(tmp_path / "one", [sys.executable])
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = run(tmp_path / "two", accelerate)
    assert "finetune-lora" in (tmp_path / "two" / "checkpoint" / "timings.json").read_text()
    assert len(one) == len(two) == 3
    assert all(abs(a - b) <= 1e-4 for a, b in zip(one, two)), (one, two)


def test_bad_data_and_config_errors(tmp_path, data, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no images"):
        finetune(config(tmp_path / "empty", tmp_path / "o1"))
    bad = make_data(tmp_path / "bad", 2)
    (bad / "1.txt").unlink()
    with pytest.raises(InvalidInputError, match="has no caption"):
        finetune(config(bad, tmp_path / "o2"))
    assert not (tmp_path / "o2").exists()  # refused before training

    from sdtorch.tomlconfig import load

    toml = tmp_path / "ft.toml"
    toml.write_text(f'out = "{tmp_path / "o3"}"\nrnak = 8\n[dataset]\nfolder = "{data}"\n')
    with pytest.raises(InvalidInputError, match=r"ft\.toml: rnak: unknown key; did you mean rank"):
        load(FineTuneConfig, toml)
    with pytest.raises(InvalidInputError, match="method must be one of"):
        config(data, tmp_path / "o4", method="lokr")


def test_disk_full_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > 1:  # the first checkpoint lands; the second finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(CheckpointError, match="No space left on device"):
        finetune(config(data, tmp_path / "o", steps=4))
    record = json.loads((tmp_path / "o" / "checkpoint" / "checkpoint.json").read_text())
    assert record["step"] == 2 and (tmp_path / "o" / "checkpoint" / record["tensors"]).is_file()
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    finetune(config(data, tmp_path / "o", steps=4))  # resumes from step 2
    assert json.loads((tmp_path / "o" / "checkpoint" / "checkpoint.json").read_text())["step"] == 4
