"""`sdtorch finetune --method controlnet` on the built-in shapes model: image / condition pairs, a run that trains only
the ControlNet, its exports (diffusers folder and original-layout file) read back by sdtorch and diffusers, exact
resume with cached latents and EMA, and the zero convolutions leaving a fresh run's UNet output and generation as
they were."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_parity, disc_pairs
from PIL import Image

import sdtorch
from sdtorch.checkpoints.controlnet_files import load_controlnet, save_controlnet
from sdtorch.checkpoints.io import read_safetensors
from sdtorch.cli import main
from sdtorch.errors import InvalidInputError
from sdtorch.models.controlnet import ControlNet
from sdtorch.request import ControlNetUnit
from sdtorch.training import controlnet_training
from sdtorch.training.datasets import DatasetConfig, FineTuneDataset
from sdtorch.training.finetune import FineTuneConfig, _Denoiser, finetune

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    return disc_pairs(tmp_path_factory.mktemp("cn"))


def config(pairs, out: Path, dataset: dict | None = None, **kw) -> FineTuneConfig:
    data, cond = pairs
    base = dict(method="controlnet", steps=3, batch_size=2, lr=1e-3, checkpoint_every=2, log_every=1, progress=False)
    settings = dict(folder=str(data), resolution=64, conditioning_folder=str(cond), **(dataset or {}))
    return FineTuneConfig(dataset=DatasetConfig(**settings), out=str(out), **{**base, **kw})


@pytest.fixture
def exports(monkeypatch) -> list[tuple[Path, dict]]:
    """(path, the in-memory ControlNet's weights as exported) of each export a run makes."""
    seen, real = [], controlnet_training.export

    def export(controlnet, path, save_format):
        seen.append((path, {k: v.detach().clone() for k, v in controlnet.state_dict().items()}))
        return real(controlnet, path, save_format)

    monkeypatch.setattr(controlnet_training, "export", export)
    return seen


def inputs(pipe, batch: int = 2):
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([30, 700][:batch])
    with torch.no_grad():
        context = pipe.text_encoder(pipe.tokenizer(["a red disc", ""][:batch]))
    return x, t, context, torch.rand(batch, 3, 64, 64, generator=g)


def residuals(model, x, t, context, cond) -> list[torch.Tensor]:
    with torch.no_grad():
        down, mid = model(x, t, context, cond)
    return [*down, mid]


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """A 3-step run from the command line (with a sample grid), the pipe it trained beside, that pipe's UNet, text
    encoder and VAE weights before the run, and the exported ControlNet's in-memory weights."""
    out = tmp_path_factory.mktemp("cn") / "out"
    pipe = sdtorch.load()
    before = {f"{n}.{k}": v.clone() for n, m in pipe.modules.items() for k, v in m.state_dict().items()}
    mp = pytest.MonkeyPatch()
    mp.setattr(sdtorch, "load", lambda source=None, device=None: pipe)
    seen, real = [], controlnet_training.export
    mp.setattr(controlnet_training, "export", lambda c, p, f: seen.append({k: v.clone() for k, v in
                                                                           c.state_dict().items()}) or real(c, p, f))
    data, cond = pairs
    try:
        code = main(["finetune", "--method", "controlnet", "--data", str(data), "--conditioning-folder", str(cond),
                     "--resolution", "64", "--out", str(out), "--steps", "3", "--batch-size", "2", "--lr", "1e-3",
                     "--checkpoint-every", "2", "--log-every", "1", "--sample-prompt", "a red disc", "--no-progress"])
    finally:
        mp.undo()
    assert code == 0
    (weights,) = seen
    return pipe, before, out, weights


def test_run_trains_only_the_controlnet(trained):
    pipe, before, out, weights = trained
    after = {f"{n}.{k}": v for n, m in pipe.modules.items() for k, v in m.state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    log = [json.loads(line) for line in (out / "checkpoint" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(0 < e["loss"] < 10 for e in log)
    assert "finetune-controlnet" in (out / "checkpoint" / "timings.json").read_text()
    zero = [k for k in weights if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))]
    zero.append("controlnet_cond_embedding.conv_out.weight")
    assert len(zero) == 2 * (9 + 1) + 1 and all(weights[k].abs().max() > 0 for k in zero)  # moved off zero
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert (out / "loss.png").is_file() and (out / "samples" / "step-00000003.png").is_file()


def test_diffusers_folder_loads_in_sdtorch_and_diffusers(trained):
    from diffusers import ControlNetModel

    pipe, _, out, weights = trained
    folder = out / "controlnet"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "ControlNetModel"
    loaded = load_controlnet(folder, base=pipe.unet.config)
    memory = ControlNet(loaded.config)
    memory.load_state_dict(weights)
    x, t, context, cond = inputs(pipe)
    ours = residuals(memory.eval(), x, t, context, cond)
    assert any(r.abs().max() > 0 for r in ours)
    for a, b in zip(residuals(loaded, x, t, context, cond), ours, strict=True):
        assert_parity(a, b, rel=1e-5)  # same weights; kernels may round apart by alignment
    reference = ControlNetModel.from_pretrained(folder).eval()
    with torch.no_grad():
        down, mid = reference(x, t, context, cond, return_dict=False)
    for a, b in zip([*down, mid], ours, strict=True):
        assert_parity(b, a, rel=1e-5)


def test_resume_is_exact_and_single_file_loads(pairs, tmp_path, exports, caplog):
    """2 steps, then the same command with steps=4, equal 4 uninterrupted steps bit for bit (EMA, accumulation,
    caption dropout, cached latents); the original-layout export loads to the in-memory (EMA) weights' residuals
    (given the config: the layout does not record the shapes model's 8 norm groups, and the export says so)."""
    dataset = dict(cache_latents=True, caption_dropout=0.5)
    kw = dict(steps=4, ema_decay=0.9, gradient_accumulation=2, save_format="single_file", output_name="edges")
    a = finetune(config(pairs, tmp_path / "a", dataset, **kw))
    finetune(config(pairs, tmp_path / "b", dataset, **{**kw, "steps": 2}))
    b = finetune(config(pairs, tmp_path / "b", dataset, **kw))
    assert a == tmp_path / "a" / "edges.safetensors" and b == tmp_path / "b" / "edges.safetensors"
    ta, tb = read_safetensors(a)[0], read_safetensors(b)[0]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert all(k.startswith("control_model.") for k in ta) and "control_model.zero_convs.0.0.weight" in ta
    assert len(list((tmp_path / "a" / "latents").glob("*.safetensors"))) == 4

    pipe = sdtorch.load()
    path, weights = exports[0]
    assert path == a
    assert "does not record this ControlNet's architecture" not in caplog.text  # the base UNet's config supplies it
    memory = ControlNet(ControlNet.from_unet(pipe.unet).config)
    loaded = load_controlnet(a, base=pipe.unet.config)
    assert loaded.config == memory.config
    memory.load_state_dict(weights)
    x, t, context, cond = inputs(pipe)
    for r, s in zip(residuals(loaded, x, t, context, cond), residuals(memory.eval(), x, t, context, cond), strict=True):
        assert_parity(r, s, rel=1e-5)
    with pytest.raises(InvalidInputError, match="different training config.*lr"):
        finetune(config(pairs, tmp_path / "b", dataset, **{**kw, "lr": 1e-2}))


def test_fresh_controlnet_changes_neither_the_unet_nor_generation(pairs, tmp_path):
    """Zero convolutions: the first step's UNet output with the new ControlNet's residuals is the plain UNet's, bit
    for bit, and so is a picture generated with it as a ControlNet unit."""
    pipe = sdtorch.load()
    controlnet = controlnet_training.controlnet_to_train(pipe, "", seed=0)
    x, t, context, cond = inputs(pipe)
    ids = pipe.tokenizer(["a red disc", ""])
    with torch.no_grad():
        plain = _Denoiser(pipe.unet, pipe.text_encoder, None, False, 1)([(x, t, ids)])[0]
        controlled = _Denoiser(pipe.unet, pipe.text_encoder, None, False, 1, controlnet)([(x, t, ids, cond)])[0]
    assert torch.equal(plain, controlled)

    folder = save_controlnet(controlnet, tmp_path / "fresh")
    condition = pairs[1] / "0.png"
    unit = ControlNetUnit(image=str(condition), model=str(folder))
    settings = dict(width=64, height=64, seed=5, num_inference_steps=4)
    without = np.asarray(pipe("a red disc", **settings)[0])
    with_unit = np.asarray(pipe("a red disc", controlnet=[unit], **settings)[0])
    assert np.array_equal(without, with_unit)

    # the sample grids' pipeline: guided by the in-memory ControlNet (here moved off zero), and only for its calls
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    drawing = controlnet_training.SamplingPipeline(pipe, controlnet, condition, tmp_path / "out")
    guided = np.asarray(drawing("a red disc", **settings)[0])
    assert drawing.unet is pipe.unet and "load_controlnet" not in vars(pipe)
    assert np.abs(guided.astype(int) - without).mean() > 1
    assert np.array_equal(np.asarray(pipe("a red disc", **settings)[0]), without)


def test_conditions_follow_their_images(tmp_path):
    """Each condition is sized and cropped as its image (a bucketed wide image, its condition at half size and
    another format), in [0, 1]; missing, ambiguous and misshapen conditions are clear errors at scan time."""
    data, cond = tmp_path / "data", tmp_path / "cond"
    data.mkdir()
    cond.mkdir()
    ramp = np.linspace(0, 255, 192, dtype=np.float32)[None, :, None] * np.ones((128, 1, 3), np.float32)
    ramp[:, :, 1] = np.linspace(255, 0, 128, dtype=np.float32)[:, None]
    image = Image.fromarray(ramp.round().astype(np.uint8))  # 192x128: horizontal red, vertical green ramps
    image.save(data / "wide.png")
    (data / "wide.txt").write_text("a ramp")
    image.save(cond / "wide.bmp")
    settings = dict(folder=str(data), resolution=64, buckets=True, bucket_step=16, min_bucket_side=32,
                    max_bucket_side=128, conditioning_folder=str(cond))
    dataset = FineTuneDataset(DatasetConfig(**settings))
    batch = dataset.batch(0, 1)
    assert batch.conditions.shape == batch.images.shape and batch.images.shape[-1] != batch.images.shape[-2]
    torch.testing.assert_close(batch.conditions, (batch.images + 1) / 2, rtol=0, atol=1e-6)
    assert dataset[0]["condition"].shape == batch.conditions.shape[1:]

    image.resize((96, 64)).save(cond / "wide.bmp")  # half size: scaled to the same crop
    half = FineTuneDataset(DatasetConfig(**settings)).batch(0, 1).conditions
    assert half.shape == batch.conditions.shape and 0 <= half.min() and half.max() <= 1
    assert (half - batch.conditions).abs().mean() < 0.02

    image.resize((64, 64)).save(cond / "wide.bmp")
    with pytest.raises(InvalidInputError, match="wide.bmp is 64x64, its training image .* 192x128: they need the "
                                                "same aspect ratio"):
        FineTuneDataset(DatasetConfig(**settings))
    image.save(cond / "wide.bmp")
    image.save(cond / "wide.png")
    with pytest.raises(InvalidInputError, match="two condition images for the stem 'wide'"):
        FineTuneDataset(DatasetConfig(**settings))


def test_missing_condition_and_config_errors(pairs, tmp_path):
    data, cond = disc_pairs(tmp_path / "pairs", 3)
    (cond / "2.png").unlink()
    with pytest.raises(InvalidInputError, match=r"training image .*2\.png has no condition image: no 2\.png "
                                                r"\(or \.jpg.*\) in conditioning_folder"):
        finetune(config((data, cond), tmp_path / "o1"))
    assert not (tmp_path / "o1").exists()  # refused before any model loads
    with pytest.raises(InvalidInputError, match="needs \\[dataset\\] conditioning_folder"):
        FineTuneConfig(dataset=DatasetConfig(folder=str(data)), out=str(tmp_path / "o"), method="controlnet")
    with pytest.raises(InvalidInputError, match="conditioning_folder is for method controlnet, not lora"):
        config(pairs, tmp_path / "o", method="lora")
    with pytest.raises(InvalidInputError, match="controlnet_model is for method controlnet, not full"):
        FineTuneConfig(dataset=DatasetConfig(folder=str(data)), out="o", method="full", controlnet_model="x")
    with pytest.raises(InvalidInputError, match="method controlnet trains no LoRA: leave rank unset"):
        config(pairs, tmp_path / "o", rank=8)
    with pytest.raises(InvalidInputError, match="trains only the ControlNet: leave train_text_encoder unset"):
        config(pairs, tmp_path / "o", train_text_encoder=True)
    with pytest.raises(InvalidInputError, match="controlnet_model .*nothing: no such ControlNet"):
        finetune(config(pairs, tmp_path / "o2", controlnet_model=str(tmp_path / "nothing")))
    with pytest.raises(InvalidInputError, match="sample_condition .*cannot read it as an image"):
        finetune(config(pairs, tmp_path / "o3", sample_condition=str(tmp_path / "none.png")))
    assert config(pairs, tmp_path / "o").export_name == "controlnet"


def test_continues_an_existing_controlnet(pairs, tmp_path, exports):
    """controlnet_model: training starts from that ControlNet's weights (one step at lr 1e-12 leaves them)."""
    pipe = sdtorch.load()
    start = controlnet_training.controlnet_to_train(pipe, "", seed=7)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.01 * torch.randn_like(p))
    source = save_controlnet(start, tmp_path / "start")  # a diffusers folder: it records the 8 norm groups
    finetune(config(pairs, tmp_path / "o", steps=1, lr=1e-12, weight_decay=0.0, max_grad_norm=0.0,
                    controlnet_model=str(source)))
    (_, weights), = exports
    for key, value in start.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-9)


def test_single_file_of_an_sd_shaped_controlnet_needs_only_the_base(tmp_path, caplog):
    """With SD's norm groups the original layout records everything else: it loads beside its UNet as saved."""
    from sdtorch.configs import TINY_SD1
    from sdtorch.models.unet import UNet

    controlnet = ControlNet.from_unet(UNet(TINY_SD1.unet))
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_controlnet(controlnet, tmp_path / "tiny.safetensors", "single_file")
    assert "does not record" not in caplog.text
    loaded = load_controlnet(path, base=TINY_SD1.unet)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    context, cond = torch.randn(1, 7, 128, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    for a, b in zip(residuals(loaded, x, t, context, cond), residuals(controlnet.eval(), x, t, context, cond),
                    strict=True):
        assert_parity(a, b, rel=1e-5)


def test_save_controlnet_never_replaces_other_things(tmp_path):
    controlnet = ControlNet.from_unet(sdtorch.load().unet)
    other = tmp_path / "model"
    other.mkdir()
    (other / "model_index.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="not replaced: it holds files a diffusers ControlNet does not"):
        save_controlnet(controlnet, other, overwrite=True)
    folder = save_controlnet(controlnet, tmp_path / "cn")
    with pytest.raises(InvalidInputError, match="pass overwrite=True"):
        save_controlnet(controlnet, folder)
    save_controlnet(controlnet, folder, overwrite=True)  # a ControlNet folder is replaced
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(InvalidInputError, match="not replaced: it is not a safetensors file"):
        save_controlnet(controlnet, text, "single_file", overwrite=True)
    assert text.read_text() == "hello" and (other / "model_index.json").is_file()
