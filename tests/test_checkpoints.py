"""Loading and saving whole models: single files, diffusers folders, round trips, and bad input."""

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import assert_parity
from safetensors.torch import load_file

import sdtorch
from sdtorch.checkpoints.keymaps import parts_to_original
from sdtorch.configs import TINY_SD1, TINY_SD2, ModelConfig
from sdtorch.errors import ArchitectureError, CheckpointError, MissingKeysError, UnsafeCheckpointError
from sdtorch.pipeline import Pipeline


def random_original_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """An original-layout state dict with random weights, as a user's downloaded file would hold."""
    from sdtorch.checkpoints.loading import MODEL_CLASSES

    part_configs = {"unet": config.unet, "vae": config.vae, "text_encoder": config.text_encoder}
    parts = {}
    for name, cls in MODEL_CLASSES.items():
        model = cls(part_configs[name])
        parts[name] = {k: torch.randn_like(v) * 0.05 for k, v in model.state_dict().items()}
    return parts_to_original(parts, config)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def original_file(request, tmp_path_factory) -> tuple[Path, ModelConfig, dict, list[str]]:
    """A tiny original-layout single file (no sdtorch metadata), its config, and the tensors sdtorch keeps.

    The file also holds what real files carry and sdtorch skips: DDPM buffers, position ids, and for
    SD2 OpenCLIP's last resblock (SD2 conditions on the penultimate one) and text projection.
    """
    from safetensors.torch import save_file

    config = TINY_SD1 if request.param == "sd1" else TINY_SD2
    torch.manual_seed(1)
    state = random_original_state(config)
    if request.param == "sd1":
        extra = {"alphas_cumprod": torch.rand(1000),
                 "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    else:
        n = config.text_encoder.num_layers
        extra = {k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}."): torch.randn_like(v)
                 for k, v in state.items() if f"transformer.resblocks.{n - 1}." in k}
        extra |= {"betas": torch.rand(1000), "cond_stage_model.model.text_projection": torch.randn(128, 128)}
    path = tmp_path_factory.mktemp(request.param) / "model.safetensors"
    save_file({**state, **extra}, str(path))
    return path, config, state, sorted(extra)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def pipe_tensors(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return parts_to_original({n: m.state_dict() for n, m in pipe.modules.items()}, pipe.config)


def test_single_file_detects_kind_and_reports_ignored(original_file):
    path, config, _, extra = original_file
    pipe = sdtorch.load(path)
    assert pipe.config == config
    assert pipe.report.prediction_type_origin == "detected"
    assert pipe.config.prediction_type == ("epsilon" if config.family == "sd1" else "v_prediction")
    assert sorted(pipe.report.ignored_keys) == extra  # skipped on purpose, and said so
    assert pipe.dtype == torch.float32
    assert sdtorch.load(path, prediction_type="epsilon").config.prediction_type == "epsilon"


def test_round_trip_single_file_diffusers_single_file(original_file, tmp_path):
    path, config, state = original_file[:3]
    first = sdtorch.load(path)
    folder = sdtorch.save(first, tmp_path / "diffusers", format="diffusers")
    second = sdtorch.load(folder)
    assert second.config == config
    single = sdtorch.save(second, tmp_path / "again.safetensors", format="single_file")
    assert_same_tensors(load_file(str(single)), state)
    third = sdtorch.load(single)
    assert third.report.prediction_type_origin == "file"
    assert_same_tensors(pipe_tensors(third), state)


def test_diffusers_save_pretrained_folder_loads_and_matches(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    config = TINY_SD1
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**{k: v for k, v in config.unet.to_diffusers().items() if k != "_class_name"})
    vae = AutoencoderKL(**{k: v for k, v in config.vae.to_diffusers().items() if k != "_class_name"})
    text = CLIPTextModel(CLIPTextConfig(**config.text_encoder.to_diffusers()))
    unet.save_pretrained(tmp_path / "m" / "unet")
    vae.save_pretrained(tmp_path / "m" / "vae")
    text.save_pretrained(tmp_path / "m" / "text_encoder")
    from sdtorch.models.tokenizer import CLIPTokenizer

    CLIPTokenizer.default().save(tmp_path / "m" / "tokenizer")
    HFTokenizer.from_pretrained(tmp_path / "m" / "tokenizer")  # transformers reads the folder too

    pipe = sdtorch.load(tmp_path / "m")
    assert pipe.config.unet == config.unet and pipe.config.vae == config.vae
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 7, config.unet.context_dim)
    with torch.no_grad():
        assert_parity(pipe.unet(x, t, ctx), unet(x, t, ctx).sample)
        img = torch.rand(1, 3, 32, 32) * 2 - 1
        assert_parity(pipe.vae.decode(pipe.vae.encode(img).mean), vae.decode(vae.encode(img).latent_dist.mean).sample)
        ids = pipe.tokenizer(["a red circle"])
        assert_parity(pipe.text_encoder(ids), text(ids).last_hidden_state)


def test_diffusers_loads_what_sdtorch_saves(original_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    path, config, _ = original_file[:3]
    pipe = sdtorch.load(path)
    folder = sdtorch.save(pipe, tmp_path / "d", format="diffusers")
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert ref.scheduler.config.prediction_type == config.prediction_type
    for name, module in pipe.modules.items():
        theirs = getattr(ref, name).state_dict()
        ours = module.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    prompt = "a photograph of an astronaut, riding a horse!!"
    theirs = ref.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(pipe.tokenizer([prompt]), theirs.input_ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_in_half_precision(original_file, dtype):
    path, _, state = original_file[:3]
    pipe = sdtorch.load(path, dtype=dtype)
    assert {p.dtype for m in pipe.modules.values() for p in m.parameters()} == {dtype}
    ours = pipe_tensors(pipe)
    assert all(torch.equal(ours[k], state[k].to(dtype)) for k in state)


def test_mapped_weights_are_private_to_the_process(original_file, tmp_path):
    """Weights in their stored dtype are copy-on-write views of the file: writing to them (training, fusing a
    LoRA) leaves the file as it was, and replacing the file (an atomic save) leaves the loaded model as it was."""
    import shutil

    path, _, state = original_file[:3]
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(path, copy)
    before = copy.read_bytes()
    pipe = sdtorch.load(copy, dtype=torch.float32)
    weight = pipe.unet.conv_in.weight
    expected = weight.clone()
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(weight, expected + 1.0)
    assert copy.read_bytes() == before
    assert torch.equal(sdtorch.load(copy).unet.conv_in.weight, expected)
    sdtorch.save(sdtorch.load(copy, dtype=torch.float16), copy, format="single_file", overwrite=True)  # renamed over
    assert torch.equal(weight, expected + 1.0)


def test_meta_load_reads_shapes_only(original_file):
    path, config, _ = original_file[:3]
    pipe = sdtorch.load(path, device="meta")
    assert pipe.config == config and str(pipe.device) == "meta"


# ---- format by content, not by extension -------------------------------------------------------

def test_safetensors_named_ckpt_and_ckpt_named_safetensors(original_file, tmp_path):
    path, config, state = original_file[:3]
    renamed = tmp_path / "model.ckpt"
    renamed.write_bytes(path.read_bytes())
    assert_same_tensors(pipe_tensors(sdtorch.load(renamed)), state)

    pickled = tmp_path / "model.safetensors"
    torch.save({"state_dict": load_file(str(path)), "global_step": 1234}, pickled)
    assert_same_tensors(pipe_tensors(sdtorch.load(pickled)), state)


def test_legacy_non_zip_pickle_checkpoint(original_file, tmp_path):
    path, _, state = original_file[:3]
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": load_file(str(path))}, legacy, _use_new_zipfile_serialization=False)
    assert_same_tensors(pipe_tensors(sdtorch.load(legacy)), state)


class _Payload:
    """Unpickling this would run `open(marker, "w")`: proof of code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_ckpt_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(str(marker))}, evil,
               _use_new_zipfile_serialization=zip_format)
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(str(proof))))  # a plain unpickler does run it
    assert proof.exists() and not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        sdtorch.load(evil)
    assert not marker.exists()


def test_raw_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        sdtorch.load(evil)
    assert not marker.exists()


# ---- bad input: clear sdtorch errors ------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        sdtorch.load(tmp_path / "nope.safetensors")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a diffusers"):
        sdtorch.load(tmp_path / "stuff")


def test_truncated_safetensors(original_file, tmp_path):
    path, _, _ = original_file[:3]
    data = path.read_bytes()
    for cut in (4, 8 + 10, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            sdtorch.load(bad)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, definitely not tensors")
    with pytest.raises(CheckpointError, match="neither a safetensors"):
        sdtorch.load(junk)
    corrupt_header = tmp_path / "header.safetensors"
    corrupt_header.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\0" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        sdtorch.load(corrupt_header)


def test_unknown_architecture_says_what_was_found(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "classifier.bias": torch.zeros(2)},
              str(tmp_path / "bert.safetensors"))
    with pytest.raises(ArchitectureError, match="encoder|classifier"):
        sdtorch.load(tmp_path / "bert.safetensors")


def test_missing_keys_are_named(original_file, tmp_path):
    from safetensors.torch import save_file

    path, config, state = original_file[:3]
    victim = "first_stage_model.decoder.mid.block_1.conv2.weight"
    save_file({k: v for k, v in state.items() if k != victim}, str(tmp_path / "m.safetensors"))
    with pytest.raises(MissingKeysError, match=r"vae: .*1 tensor.*decoder\.mid_block\.resnets\.0\.conv2\.weight"):
        sdtorch.load(tmp_path / "m.safetensors")
    victim = "model.diffusion_model.out.2.weight"  # one the architecture is read from
    save_file({k: v for k, v in state.items() if k != victim}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ArchitectureError, match=r"out\.2\.weight"):
        sdtorch.load(tmp_path / "m.safetensors")


def test_bad_prediction_type_and_format(original_file, tmp_path):
    path, _, _ = original_file[:3]
    with pytest.raises(sdtorch.errors.InvalidInputError):
        sdtorch.load(path, prediction_type="x0-ish")
    pipe = sdtorch.load(path)
    with pytest.raises(sdtorch.errors.InvalidInputError):
        sdtorch.save(pipe, tmp_path / "x", format="onnx")


def test_failed_save_leaves_destination_untouched(original_file, tmp_path, monkeypatch):
    path, _, _ = original_file[:3]
    pipe = sdtorch.load(path)
    dst = tmp_path / "keep.safetensors"
    dst.write_bytes(path.read_bytes())

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(CheckpointError, match=f"{dst}: No space left"):
        sdtorch.save(pipe, dst, format="single_file", overwrite=True)
    assert dst.read_bytes() == path.read_bytes()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'new.safetensors'}: No space left"):
        sdtorch.save(pipe, tmp_path / "new.safetensors", format="single_file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    with pytest.raises(CheckpointError, match="No space left"):
        sdtorch.save(pipe, tmp_path / "folder", format="diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_cli_info_and_convert(original_file, tmp_path, capsys):
    from sdtorch.cli import main

    path, config, state = original_file[:3]
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"kind:            {config.kind}" in out and "prediction type" in out and "parameters:" in out
    assert main(["convert", str(path), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    assert json.loads((tmp_path / "d" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "s.safetensors"), "--to", "single-file"]) == 0
    assert_same_tensors(pipe_tensors(sdtorch.load(tmp_path / "s.safetensors")), state)
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_hub_id_fetches_only_needed_files_and_offline_fails_clearly(original_file, tmp_path, monkeypatch):
    import types

    import huggingface_hub
    from huggingface_hub import constants

    path, config, state = original_file[:3]
    folder = sdtorch.save(sdtorch.load(path), tmp_path / "snapshot", format="diffusers")
    asked = {}

    def fake_model_info(self, repo_id, timeout=None, **kwargs):
        asked.update(timeout=timeout)
        return types.SimpleNamespace(sha="0" * 40)

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns, **kwargs)
        return str(folder)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    pipe = sdtorch.load("someone/tiny-model")
    assert asked["repo_id"] == "someone/tiny-model" and asked["revision"] == "0" * 40
    assert asked["timeout"] == constants.HF_HUB_ETAG_TIMEOUT  # the look-up cannot hang
    assert "unet/diffusion_pytorch_model.safetensors" in asked["allow_patterns"]
    assert not any(p.endswith((".bin", ".ckpt")) or p == "*" for p in asked["allow_patterns"])
    assert_same_tensors(pipe_tensors(pipe), state)

    def offline(self, repo_id, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    asked.clear()
    assert_same_tensors(pipe_tensors(sdtorch.load("someone/tiny-model")), state)  # the cached copy
    assert asked["local_files_only"] is True

    def not_cached(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(CheckpointError, match="hub for 'someone/tiny-model'.*not in the local cache.*local file"):
        sdtorch.load("someone/tiny-model")


def test_written_files_get_an_ordinary_mode(tmp_path):
    import os

    from sdtorch.checkpoints.io import write_json, write_safetensors

    old = os.umask(0o022)
    try:
        write_json({"a": 1}, tmp_path / "x.json")
        write_safetensors({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors writes a file of its own


def test_single_file_carries_a_tokenizer_only_when_clip_cannot_rebuild_it(original_file, tmp_path):
    from sdtorch.checkpoints.io import read_shapes
    from sdtorch.checkpoints.loading import TOKENIZER_METADATA_KEY

    pipe = sdtorch.load(original_file[0])  # CLIP's vocabulary (SD1: pad <|endoftext|>, SD2: pad "!")
    path = sdtorch.save(pipe, tmp_path / "s.safetensors", format="single_file")
    assert TOKENIZER_METADATA_KEY not in read_shapes(path)[1]
    assert sdtorch.load(path).tokenizer.to_dict() == pipe.tokenizer.to_dict()


def test_save_replaces_only_a_model_of_the_same_kind(original_file, tmp_path):
    pipe = sdtorch.load(original_file[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sdtorch.save(pipe, empty) == empty  # an empty folder holds nothing to lose
    (empty / "README.md").write_text("model card")
    (empty / ".gitattributes").write_text("*.safetensors filter=lfs")
    with pytest.raises(sdtorch.errors.InvalidInputError, match="already exists; pass overwrite=True"):
        sdtorch.save(pipe, empty)
    sdtorch.save(pipe, empty, overwrite=True)  # a hub-style model folder is a model: replaced
    assert not (empty / "README.md").exists()
    with pytest.raises(sdtorch.errors.InvalidInputError, match="is a folder"):
        sdtorch.save(pipe, empty, format="single_file", overwrite=True)
    with pytest.raises(sdtorch.errors.InvalidInputError, match="is a file; a diffusers model is a folder"):
        sdtorch.save(pipe, original_file[0], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no staging or moved-aside folder left
