"""A VAE given apart from the checkpoint (`pipe.load_vae`, `--vae`; A1111's "SD VAE"): each layout users bring
loads to exactly the VAE with those weights, generation then equals a model built with them, None restores the
checkpoint's own VAE exactly, bad files change nothing, and the infotext carries A1111's "VAE hash" and "VAE"."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdtorch
from conftest import random_pipeline
from sdtorch.checkpoints.io import file_sha256
from sdtorch.checkpoints.keymaps import parts_to_original
from sdtorch.cli import main
from sdtorch.configs import TINY_SD1, TINY_SDXL
from sdtorch.errors import ArchitectureError, CheckpointError, InvalidInputError, UnsafeCheckpointError
from sdtorch.infotext import parse_infotext, read_infotext
from sdtorch.models.vae import AutoencoderKL

SETTINGS = dict(width=32, height=32, steps=3, cfg_scale=5.0, seed=7, sampler_name="Euler")
PROMPT = "a red circle"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def random_vae(config, seed: int) -> AutoencoderKL:
    """A VAE of `config` with weights unlike any random_pipeline's."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(config.vae)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae.eval()


@pytest.fixture(scope="module")
def vae():
    return random_vae(TINY_SD1, seed=99)


def original_layout(vae: AutoencoderKL, config=TINY_SD1, prefix: bool = False) -> dict[str, torch.Tensor]:
    """The VAE's tensors as the original single files name them (`encoder.down.0...`, 1x1-conv attention)."""
    tensors = parts_to_original({"vae": vae.state_dict()}, config)
    return {(k if prefix else k.removeprefix("first_stage_model.")): v.clone() for k, v in tensors.items()}


def diffusers_folder(vae: AutoencoderKL, folder, scaling_factor=None):
    """The VAE saved by diffusers' own AutoencoderKL.save_pretrained (config.json + safetensors)."""
    import diffusers

    config = vae.config.to_diffusers()
    config.pop("_class_name")
    if scaling_factor is not None:
        config["scaling_factor"] = scaling_factor
    reference = diffusers.AutoencoderKL(**config)
    reference.load_state_dict(vae.state_dict())
    reference.save_pretrained(folder)
    return folder


def decode(vae: AutoencoderKL, seed: int = 0) -> torch.Tensor:
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return vae.decode(z.to(next(vae.parameters()).dtype))


def images(pipe, **kw) -> list[np.ndarray]:
    return [np.asarray(img) for img in pipe(PROMPT, **{**SETTINGS, **kw})]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def layouts(vae, tmp_path):
    """{what: path} of the same VAE in every layout a user may bring."""
    plain = original_layout(vae)
    junk = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32)}
    save_file(plain, str(tmp_path / "vae-ft-mse.safetensors"))
    save_file(original_layout(vae, prefix=True), str(tmp_path / "prefixed.safetensors"))
    save_file({**plain, **junk}, str(tmp_path / "with-loss.safetensors"))
    torch.save({"state_dict": {**original_layout(vae, prefix=True), **junk}}, tmp_path / "vae-ft-mse.ckpt")
    folder = diffusers_folder(vae, tmp_path / "sd-vae-ft-mse")
    single = tmp_path / "diffusion_pytorch_model.safetensors"
    single.write_bytes((folder / "diffusion_pytorch_model.safetensors").read_bytes())
    names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # before diffusers 0.14
    old = {}
    for key, value in vae.state_dict().items():
        for before, now in names.items():
            key = key.replace(f"attentions.0.{now}.", f"attentions.0.{before}.")
        old[key] = value.clone()
    save_file(old, str(tmp_path / "old-diffusers.safetensors"))
    return {"original": tmp_path / "vae-ft-mse.safetensors", "prefixed": tmp_path / "prefixed.safetensors",
            "loss and ema keys": tmp_path / "with-loss.safetensors", "ckpt": tmp_path / "vae-ft-mse.ckpt",
            "diffusers folder": folder, "diffusers file": single, "old diffusers names": tmp_path / "old-diffusers.safetensors"}


def test_every_layout_loads_to_exactly_that_vae(vae, tmp_path):
    pipe = random_pipeline(TINY_SD1, seed=3)
    module, own = pipe.vae, decode(pipe.vae)
    expected = decode(vae)
    for what, path in layouts(vae, tmp_path).items():
        assert pipe.load_vae(path) is pipe
        assert pipe.vae is module, what  # the same module, new weights: whatever holds it sees them
        assert torch.equal(decode(pipe.vae), expected), what
        assert pipe.vae.scaling_factor == 0.18215
        assert pipe.loaded_vae.name == path.name and pipe.loaded_vae.hash == file_sha256(
            path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path)[:10], what
    assert set(pipe.loaded_vae.ignored_keys) == set()
    pipe.load_vae(tmp_path / "vae-ft-mse.ckpt")
    assert sorted(pipe.loaded_vae.ignored_keys) == ["loss.discriminator.main.0.weight", "loss.logvar",
                                                    "model_ema.decay", "model_ema.num_updates"]
    pipe.load_vae(None)
    assert pipe.loaded_vae is None and torch.equal(decode(pipe.vae), own)


def test_a_whole_models_folder_gives_its_vae(vae, tmp_path):
    pipe = random_pipeline(TINY_SD1, seed=3)
    other = random_pipeline(TINY_SD1, seed=5)
    other.vae.load_state_dict(vae.state_dict())
    folder = sdtorch.save(other, tmp_path / "model", format="diffusers")
    pipe.load_vae(folder)
    assert torch.equal(decode(pipe.vae), decode(vae)) and pipe.loaded_vae.name == "model"


def test_generation_with_the_vae_equals_a_model_built_with_it_and_none_restores(vae, tmp_path):
    pipe = random_pipeline(TINY_SD1, seed=3)
    own = images(pipe, batch_size=2)
    built = random_pipeline(TINY_SD1, seed=3)
    built.vae.load_state_dict(vae.state_dict())
    reference = images(built, batch_size=2)
    assert not np.array_equal(own[0], reference[0])
    img2img = dict(image=pipe(PROMPT, **SETTINGS)[0], denoising_strength=0.6)  # encodes with the VAE too
    path = tmp_path / "vae.safetensors"
    save_file(original_layout(vae), str(path))
    pipe.load_vae(path)
    for got, want in zip(images(pipe, batch_size=2), reference):
        assert np.array_equal(got, want)
    assert np.array_equal(images(pipe, **img2img)[0], images(built, **img2img)[0])
    pipe.load_vae(tmp_path / "vae.safetensors")  # again, and then back: still the checkpoint's own
    pipe.load_vae(None)
    for got, want in zip(images(pipe, batch_size=2), own):
        assert np.array_equal(got, want)
    pipe.load_vae(None)  # nothing loaded: nothing to do
    assert pipe.loaded_vae is None


def test_sdxl_takes_an_fp16_fix_folder_and_keeps_its_scaling_factor(tmp_path):
    pipe = random_pipeline(TINY_SDXL, seed=21)
    fixed = random_vae(TINY_SDXL, seed=8)
    built = random_pipeline(TINY_SDXL, seed=21)
    built.vae.load_state_dict(fixed.state_dict())
    pipe.load_vae(diffusers_folder(fixed, tmp_path / "sdxl-vae-fp16-fix", scaling_factor=0.13025))
    assert pipe.vae.scaling_factor == 0.13025
    assert np.array_equal(images(pipe)[0], images(built)[0])
    wrong_family = diffusers_folder(fixed, tmp_path / "sd-vae", scaling_factor=0.18215)
    with pytest.raises(ArchitectureError, match=r"config.json.*0\.18215.*sdxl model's are scaled by 0\.13025"):
        pipe.load_vae(wrong_family)
    assert pipe.loaded_vae.name == "sdxl-vae-fp16-fix"


def test_dtype_and_device_are_the_models(vae, tmp_path):
    pipe = random_pipeline(TINY_SD1, seed=3).to(dtype=torch.bfloat16)
    pipe.vae.requires_grad_(False)  # as sdtorch.load leaves it
    path = tmp_path / "vae.safetensors"
    save_file(original_layout(vae), str(path))  # float32
    pipe.load_vae(path)
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert torch.equal(decode(pipe.vae), decode(random_vae(TINY_SD1, seed=99).to(torch.bfloat16)))
    assert all(not p.requires_grad for p in pipe.vae.parameters())
    pipe.to(dtype=torch.float32)
    pipe.load_vae(None)  # the checkpoint's own weights, in the dtype the model has now
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.float32}


def test_bad_files_are_clear_errors_and_change_nothing(vae, tmp_path):
    pipe = random_pipeline(TINY_SD1, seed=3)
    good = tmp_path / "good.safetensors"
    save_file(original_layout(vae), str(good))
    pipe.load_vae(good)
    before, loaded = dict(pipe.vae.state_dict()), pipe.loaded_vae

    wider = random_vae(dataclasses.replace(TINY_SD1, vae=dataclasses.replace(TINY_SD1.vae, block_channels=(64, 128))), 1)
    save_file(original_layout(wider, prefix=True), str(tmp_path / "wider.safetensors"))
    odd = original_layout(vae)
    odd["decoder.up.0.block.0.nin_shortcut.weight"] = torch.zeros(32, 48, 1, 1)
    save_file(odd, str(tmp_path / "odd.safetensors"))
    deeper = random_vae(dataclasses.replace(TINY_SD1, vae=dataclasses.replace(TINY_SD1.vae, layers_per_block=2)), 1)
    save_file(deeper.state_dict(), str(tmp_path / "deeper.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    whole = sdtorch.save(random_pipeline(TINY_SD1, seed=4), tmp_path / "whole.safetensors", format="single_file")
    unet_only = {k: v for k, v in load_file(str(whole)).items() if k.startswith("model.diffusion_model.")}
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in unet_only.items()}, str(tmp_path / "unet.safetensors"))
    (tmp_path / "empty").mkdir()

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"state_dict": original_layout(vae), "x": Payload()}, tmp_path / "evil.ckpt")
    cases = [
        ("wider.safetensors", ArchitectureError, r"wider\.safetensors: tensor first_stage_model\.encoder\.conv_in\.weight "
                                                 r"has shape \[64, 3, 3, 3\], this model's VAE needs \[32, 3, 3, 3\]"),
        ("odd.safetensors", ArchitectureError, r"odd\.safetensors: tensor decoder\.up\.0\.block\.0\.nin_shortcut\.weight "
                                               r"has shape \[32, 48, 1, 1\]"),
        ("deeper.safetensors", ArchitectureError, r"deeper\.safetensors: tensor\(s\) this model's VAE does not have: "
                                                  r"decoder\.up_blocks\.0\.resnets\.2"),
        ("truncated.safetensors", CheckpointError, r"truncated\.safetensors: truncated"),
        ("whole.safetensors", ArchitectureError, r"whole\.safetensors: .* not a VAE's .*a whole checkpoint"),
        ("unet.safetensors", ArchitectureError, r"unet\.safetensors: not a VAE of this sd1 model in the original "
                                                r"layout or diffusers': .*input_blocks"),
        ("evil.ckpt", UnsafeCheckpointError, r"evil\.ckpt: refused to unpickle"),
        ("empty", CheckpointError, r"empty: a folder without a VAE's weights"),
        ("missing.safetensors", CheckpointError, r"no such VAE file or folder: .*missing\.safetensors"),
    ]
    for name, error, message in cases:
        with pytest.raises(error, match=message):
            pipe.load_vae(tmp_path / name)
        assert pipe.loaded_vae is loaded, name
        assert same_weights(dict(pipe.vae.state_dict()), before), name
    with pytest.raises(InvalidInputError, match="path"):
        pipe.load_vae(42)


def test_the_infotext_names_the_vae_as_a1111_does(vae, tmp_path):
    pipe = random_pipeline(TINY_SD1, seed=3)
    path = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(original_layout(vae), str(path))
    assert "VAE" not in parse_infotext(pipe(PROMPT, **SETTINGS)[0].info["parameters"]).extra
    pipe.load_vae(path)
    text = pipe(PROMPT, **SETTINGS)[0].info["parameters"]
    digest = file_sha256(path)[:10]
    assert f"VAE hash: {digest}, VAE: vae-ft-mse-840000-ema-pruned.safetensors" in text
    assert parse_infotext(text).extra == {"VAE hash": digest, "VAE": "vae-ft-mse-840000-ema-pruned.safetensors"}
    pipe.load_vae(None)
    assert "VAE" not in pipe(PROMPT, **SETTINGS)[0].info["parameters"]


def test_the_cli_takes_a_vae(vae, tmp_path, capsys):
    model = sdtorch.save(random_pipeline(TINY_SD1, seed=3), tmp_path / "tiny.safetensors", format="single_file")
    folder = diffusers_folder(vae, tmp_path / "my vae")
    base = ["generate", PROMPT, "--model", str(model), "--width", "32", "--height", "32", "--steps", "3",
            "--seed", "7", "--sampler", "Euler", "--cfg", "5", "--quiet", "--out"]
    assert main([*base, str(tmp_path / "with.png"), "--vae", str(folder)]) == 0
    info = parse_infotext(read_infotext(tmp_path / "with.png"))
    assert info.extra["VAE"] == "my vae"
    assert info.extra["VAE hash"] == file_sha256(folder / "diffusion_pytorch_model.safetensors")[:10]
    expected = sdtorch.load(model).load_vae(folder)(PROMPT, **SETTINGS)[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "with.png").convert("RGB")), np.asarray(expected))
    capsys.readouterr()
    assert main([*base, str(tmp_path / "no.png"), "--vae", str(tmp_path / "missing.safetensors")]) == 2
    assert "--vae" in capsys.readouterr().err and not (tmp_path / "no.png").exists()
    wrong = random_vae(dataclasses.replace(TINY_SD1, vae=dataclasses.replace(TINY_SD1.vae, block_channels=(64, 128))), 1)
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    assert main([*base, str(tmp_path / "no.png"), "--vae", str(tmp_path / "wrong.safetensors")]) == 2
    assert "wrong.safetensors: tensor encoder.conv_in.weight has shape" in capsys.readouterr().err


def test_the_server_gives_each_model_the_vae(vae, tmp_path):
    from sdtorch.request import Limits
    from sdtorch.server.catalog import Checkpoint
    from sdtorch.server.host import ModelHost

    model = sdtorch.save(random_pipeline(TINY_SD1, seed=3), tmp_path / "tiny.safetensors", format="single_file")
    path = tmp_path / "vae.safetensors"
    save_file(original_layout(vae), str(path))
    host = ModelHost(Limits(), None, None, vae=path)
    loaded = host.get(Checkpoint("tiny.safetensors", str(model), str(model)))
    assert loaded.pipe.loaded_vae.name == "vae.safetensors"
    assert torch.equal(decode(loaded.pipe.vae), decode(vae))


def test_the_server_lists_its_vae_and_the_refiner_decodes_with_it(vae, tmp_path):
    from serving import running_server

    from sdtorch.server.service import ServerConfig

    model = sdtorch.save(random_pipeline(TINY_SD1, seed=3), tmp_path / "tiny.safetensors", format="single_file")
    path = tmp_path / "vae.safetensors"
    save_file(original_layout(vae), str(path))
    with running_server(ServerConfig(model=str(model), vae=path)) as client:
        assert client.get("/sdapi/v1/sd-vae").body == [{"model_name": "vae.safetensors", "filename": str(path.resolve())}]
    with running_server(ServerConfig(model=str(model))) as client:
        assert client.get("/sdapi/v1/sd-vae").body == []
    pipe = sdtorch.load(model).load_vae(path)
    refiner = pipe.load_refiner(str(model))
    assert refiner.loaded_vae.name == "vae.safetensors"
    assert torch.equal(decode(refiner.vae), decode(vae))
