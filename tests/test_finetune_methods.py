"""`sdtorch finetune --method dreambooth` (prior preservation with class images the base model draws and
caches; the whole UNet or a LoRA), `--method full` and sample grids while training, on the shapes model."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import sdtorch
from sdtorch.checkpoints.io import read_safetensors, read_safetensors_header
from sdtorch.cli import main
from sdtorch.errors import InvalidInputError
from sdtorch.infotext import parse_infotext
from sdtorch.sampling.schedules import DiscreteSchedule
from sdtorch.training.datasets import DatasetConfig, FineTuneDataset
from sdtorch.training.dreambooth import DreamBoothConfig
from sdtorch.training.finetune import FineTuneConfig, LossPart, finetune, finetune_loss
from sdtorch.training.loop import step_generator

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

CLASS_PROMPT = "a circle"


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """Three uncaptioned pictures of one subject: a magenta ring."""
    folder = tmp_path_factory.mktemp("db") / "subject"
    folder.mkdir()
    for i in range(3):
        image = Image.new("RGB", (64, 64), "white")
        image.paste((230, 0, 200), (16 + 4 * i, 16, 48, 48 - 4 * i))
        image.save(folder / f"{i}.png")
    return folder


def captioned_images(folder: Path, colour: tuple[int, int, int], caption: str) -> Path:
    """Two 64 px pictures in shades of `colour`, both captioned `caption`."""
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), tuple(min(c + 40 * i, 255) for c in colour)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return folder


def db_config(data: Path, out: Path, dreambooth: DreamBoothConfig, **kw) -> FineTuneConfig:
    base = dict(method="dreambooth", steps=2, batch_size=2, lr=1e-3, checkpoint_every=2, log_every=1, progress=False)
    return FineTuneConfig(dataset=DatasetConfig(folder=str(data), resolution=64, cache_latents=True), out=str(out),
                          dreambooth=dreambooth, **{**base, **kw})


def test_dreambooth_full_with_prior_preservation(subject, tmp_path):
    dreambooth = DreamBoothConfig(instance_prompt="a sks circle", class_prompt=CLASS_PROMPT, num_class_images=3)
    result = finetune(db_config(subject, tmp_path / "out", dreambooth, save_format="single_file"))
    assert result == tmp_path / "out" / "model.safetensors"
    class_images = sorted((tmp_path / "out" / "class_images").glob("*.png"))
    assert [p.name for p in class_images] == ["00000-0.png", "00001-1.png", "00002-2.png"]
    info = parse_infotext(Image.open(class_images[1]).info["parameters"])
    assert info.request.prompt == CLASS_PROMPT and info.request.seed == 1 and info.request.width == 64

    base, tuned = sdtorch.load(), sdtorch.load(result)
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, tuned.unet.state_dict()[k])]
    assert changed and all(torch.equal(v, tuned.text_encoder.state_dict()[k])
                           for k, v in base.text_encoder.state_dict().items())
    log = [json.loads(line) for line in (tmp_path / "out" / "checkpoint" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(0 < e["loss"] < 10 for e in log)

    # a second run with the class folder in place (now with 4 wanted) draws only the missing one
    again = DreamBoothConfig(instance_prompt="a sks circle", class_prompt=CLASS_PROMPT, num_class_images=4,
                             class_dir=str(tmp_path / "out" / "class_images"), lora=True)
    before = [p.stat().st_mtime_ns for p in class_images]
    lora = finetune(db_config(subject, tmp_path / "lora", again, rank=2))
    assert [p.stat().st_mtime_ns for p in class_images] == before
    assert len(list((tmp_path / "out" / "class_images").glob("*.png"))) == 4
    _, meta, _ = read_safetensors_header(lora)
    assert meta["ss_num_reg_images"] == "4" and meta["ss_num_train_images"] == "3" and meta["ss_network_dim"] == "2"
    assert not (tmp_path / "lora" / "class_images").exists()


def test_prior_loss_weight_weighs_the_class_batch(subject, tmp_path):
    """The logged loss of step 1 is instance + w * class: weight 0 and weight 2 runs, from the same start, give
    l0 and l2 with (l2 - l0) / 2 the class part, which is positive; no prior gives l0 exactly."""
    losses = {}
    for name, weight in (("w0", 0.0), ("w2", 2.0), ("none", None)):
        prior = {} if weight is None else dict(class_prompt=CLASS_PROMPT, num_class_images=2,
                                               class_dir=str(tmp_path / "class"), prior_loss_weight=weight)
        finetune(db_config(subject, tmp_path / name, DreamBoothConfig(instance_prompt="a sks circle", **prior),
                           steps=1, lr=1e-6))
        losses[name] = json.loads((tmp_path / name / "checkpoint" / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert losses["none"] == pytest.approx(losses["w0"], rel=1e-6)
    assert losses["w2"] - losses["w0"] > 1e-4


def test_finetune_loss_sums_weighted_parts_and_mixes_sizes():
    """Two parts in one model call equal their losses apart; parts of different latent sizes run apart."""
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, parts):
            return [self.conv(x_t) * (1 + t.float().view(-1, 1, 1, 1) / 1000) + ids.float().mean()
                    for x_t, t, ids in parts]

    torch.manual_seed(0)
    model, schedule = Toy(), DiscreteSchedule(sdtorch.load().config.schedule)
    common = dict(rows=slice(0, 2), global_batch=2, prediction_type="epsilon", snr_gamma=None, noise_offset=0.0)

    def part(shape, step, weight):
        return LossPart(torch.randn(2, 4, *shape), torch.randint(0, 9, (2, 77)), step_generator(0, step), weight)

    for shapes in (((8, 8), (8, 8)), ((8, 8), (8, 16))):
        torch.manual_seed(1)
        a, b = part(shapes[0], 0, 1.0), part(shapes[1], 1, 0.5)
        alone = [finetune_loss(model, [LossPart(p.latents, p.ids, step_generator(0, s), p.weight)], schedule, **common)
                 for p, s in ((a, 0), (b, 1))]
        both = finetune_loss(model, [a, b], schedule, **common)
        torch.testing.assert_close(both, alone[0] + alone[1], rtol=1e-6, atol=0)


def test_full_finetune_of_unet_and_text_encoder(tmp_path):
    data = captioned_images(tmp_path / "data", (200, 30, 30), "a red square")
    config = FineTuneConfig(dataset=DatasetConfig(folder=str(data), resolution=64), out=str(tmp_path / "out"),
                            method="full", steps=2, batch_size=2, lr=1e-4, train_text_encoder=True,
                            checkpoint_every=2, progress=False, output_name="tuned")
    result = finetune(config)
    assert result == tmp_path / "out" / "tuned" and (result / "model_index.json").is_file()
    base, tuned = sdtorch.load(), sdtorch.load(result)
    for part in ("unet", "text_encoder"):
        ours, theirs = getattr(base, part).state_dict(), getattr(tuned, part).state_dict()
        assert any(not torch.equal(v, theirs[k]) for k, v in ours.items()), part
    assert all(torch.equal(v, tuned.vae.state_dict()[k]) for k, v in base.vae.state_dict().items())


def test_instance_prompt_replaces_captions(subject):
    with pytest.raises(InvalidInputError, match="has no caption"):
        FineTuneDataset(DatasetConfig(folder=str(subject), resolution=64))
    dataset = FineTuneDataset(DatasetConfig(folder=str(subject), resolution=64), caption="a sks circle")
    assert {dataset[i]["caption"] for i in range(len(dataset))} == {"a sks circle"}


def test_config_errors(subject, tmp_path):
    def make(**kw):
        base = dict(dataset=DatasetConfig(folder=str(subject), resolution=64), out=str(tmp_path / "o"))
        return FineTuneConfig(**{**base, **kw})

    with pytest.raises(InvalidInputError, match=r"dreambooth needs the \[dreambooth\] section"):
        make(method="dreambooth")
    with pytest.raises(InvalidInputError, match=r"\[dreambooth\] is for method dreambooth, not lora"):
        make(method="lora", dreambooth=DreamBoothConfig(instance_prompt="a sks circle"))
    with pytest.raises(InvalidInputError, match="trains no LoRA: leave rank, lora_targets unset"):
        make(method="full", rank=8, lora_targets="locon")
    with pytest.raises(InvalidInputError, match="trains no LoRA: leave alpha unset"):
        make(method="dreambooth", dreambooth=DreamBoothConfig(instance_prompt="x"), alpha=4.0)
    make(method="dreambooth", dreambooth=DreamBoothConfig(instance_prompt="x", lora=True), alpha=4.0)  # fine
    with pytest.raises(InvalidInputError, match="save_format is for full"):
        make(method="lora", save_format="single_file")
    with pytest.raises(InvalidInputError, match="class_dir is for prior preservation"):
        DreamBoothConfig(class_dir="x")
    with pytest.raises(InvalidInputError, match="num_class_images must be >= 1"):
        DreamBoothConfig(class_prompt="a dog", num_class_images=0)


def test_cli_runs_dreambooth(subject, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["finetune", "--method", "dreambooth", "--data", str(subject), "--resolution", "64", "--out",
                 str(out), "--instance-prompt", "a sks circle", "--class-prompt", CLASS_PROMPT, "--num-class-images",
                 "2", "--dreambooth-lora", "--rank", "2", "--steps", "1", "--batch-size", "1", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "lora.safetensors")
    assert len(list((out / "class_images").glob("*.png"))) == 2
    assert main(["finetune", "--method", "dreambooth", "--data", str(subject), "--out", str(tmp_path / "x"),
                 "--instance-prompt", "a sks circle", "--rank", "2"]) == 2
    assert "trains no LoRA: leave rank unset" in capsys.readouterr().err


def test_sample_grids_change_nothing_training_sees(tmp_path):
    """Sample grids every step (LoRA with dropout, so the global RNG matters) leave the weights as a run without."""
    data = captioned_images(tmp_path / "data", (30, 30, 200), "a blue circle")
    results = {}
    for name, prompts in (("plain", ()), ("sampled", ("a red star", "a blue circle"))):
        config = FineTuneConfig(dataset=DatasetConfig(folder=str(data), resolution=64), out=str(tmp_path / name),
                                steps=2, batch_size=2, lr=1e-2, lora_dropout=0.5, checkpoint_every=2, progress=False,
                                sample_prompts=prompts, sample_every=1)
        results[name] = read_safetensors(finetune(config))[0]
    assert results["plain"].keys() == results["sampled"].keys()
    assert all(torch.equal(v, results["sampled"][k]) for k, v in results["plain"].items())
    grids = sorted(p.name for p in (tmp_path / "sampled" / "samples").iterdir())
    assert grids == ["step-00000001.png", "step-00000002.png"] and not (tmp_path / "plain" / "samples").exists()
    grid = Image.open(tmp_path / "sampled" / "samples" / grids[0])
    assert grid.width > 2 * 192 and grid.height > 192  # two 64 px pictures upscaled 3x side by side, labelled


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    """LoRA on UNet + text encoder with dropout: the run with checkpointed UNet blocks ends with the same weights,
    and the blocks really recompute (their forward runs twice a step)."""
    from sdtorch.models.attention import SpatialTransformer

    data = captioned_images(tmp_path / "data", (200, 200, 30), "a yellow star")
    calls = []
    original = SpatialTransformer.forward
    mp = pytest.MonkeyPatch()
    mp.setattr(SpatialTransformer, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    results = {}
    try:
        for checkpointing in (False, True):
            calls.clear()
            config = FineTuneConfig(dataset=DatasetConfig(folder=str(data), resolution=64),
                                    out=str(tmp_path / str(checkpointing)),
                                    steps=2, batch_size=2, lr=1e-2, lora_dropout=0.3, lora_targets="locon",
                                    train_text_encoder=True, gradient_checkpointing=checkpointing, checkpoint_every=2,
                                    progress=False)
            results[checkpointing] = (read_safetensors(finetune(config))[0], len(calls))
    finally:
        mp.undo()
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results[False], results[True]
    assert checkpointed_calls == 2 * plain_calls > 0
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-7)


def test_class_images_with_caption_files_keep_them(subject, tmp_path):
    from sdtorch.training.dreambooth import class_dataset

    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), "white").save(folder / f"{i}.png")
    (folder / "1.txt").write_text("a large red circle\n")
    images = class_dataset(DreamBoothConfig(class_prompt=CLASS_PROMPT), DatasetConfig(folder=str(subject)), folder)
    assert [record.caption for record in images.images] == [CLASS_PROMPT, "a large red circle"]


def test_textual_inversion_refuses_several_processes(subject, tmp_path, monkeypatch):
    from sdtorch.training.textual_inversion import TextualInversionConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = FineTuneConfig(dataset=DatasetConfig(folder=str(subject), resolution=64, require_captions=False),
                            out=str(tmp_path / "ti"), method="textual-inversion",
                            textual_inversion=TextualInversionConfig(name="ring", init_word="circle"))
    with pytest.raises(InvalidInputError, match="textual inversion trains in one process"):
        finetune(config)
    assert not (tmp_path / "ti").exists()
