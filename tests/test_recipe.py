"""The from-scratch recipe, end to end at toy size: stages, resumption, timings, and the model it ships."""

import json
import re
from pathlib import Path

import pytest
import torch

import sdtorch
from sdtorch.errors import InvalidInputError
from sdtorch.data.shapes import ShapesDataset
from sdtorch.evaluation.judge import load_judge
from sdtorch.models.vae import AutoencoderKL, DiagonalGaussian
from sdtorch.configs import TINY_SD1, ModelConfig
from sdtorch.training.recipe import (
    STAGES, CLIPStageConfig, DataConfig, DecoderStageConfig, ExportConfig, MetricsConfig, Recipe, RecipeConfig,
    UNetStageConfig, VAEStageConfig, run_recipe, vae_judged,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES_RECIPE = Path(__file__).parent.parent / "configs" / "shapes.toml"


def toy_recipe(tmp_path: Path) -> Path:
    """configs/shapes.toml shrunk: few items, two steps per stage, tiny evaluation."""
    text = SHAPES_RECIPE.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^items = \d+", "items = 96", text)
    text = re.sub(r"(?m)^steps = \d+", "steps = 2\ncheckpoint_every = 1", text)
    text = re.sub(r"(?m)^batch_size = \d+", "batch_size = 4", text)
    text = re.sub(r"(?m)^vae_images = \d+", "vae_images = 8", text)
    text = re.sub(r"(?m)^clip_captions = \d+", "clip_captions = 8", text)
    path = tmp_path / "toy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_recipe_parses():
    config = RecipeConfig.from_file(SHAPES_RECIPE)
    assert config.model.unet.sample_size * 8 == config.data.image_size == 64
    assert len(config.model.vae.block_channels) == 4  # three 2x downsamplings: 64 px -> 8x8 latents
    assert config.model.unet.context_dim == config.model.text_encoder.width


def test_shipped_recipe_parses_to_typed_values():
    config = RecipeConfig.from_file(SHAPES_RECIPE)
    assert (config.seed, config.data, config.tokenizer.vocab_size) == (0, DataConfig(items=20000, image_size=64), 1024)
    assert config.model.unet.block_channels == (64, 128, 176) and config.model.unet.attention_levels == (True,) * 3
    assert config.vae == VAEStageConfig(
        steps=5500, batch_size=8, lr=1e-3, warmup_steps=100, kl_weight=1e-5, edge_weight=0.5, mse_weight=1.0,
        foreground_weight=5.0, max_objects=4,
    )
    assert config.clip == CLIPStageConfig(steps=800, batch_size=128, lr=1e-3, image_channels=(16, 32, 64, 128))
    assert config.unet == UNetStageConfig(
        steps=2800, batch_size=64, lr=5e-4, warmup_steps=200, cfg_dropout=0.1, ema_decay=0.999, max_grad_norm=1.0,
        snr_gamma=5.0,
    )
    assert config.decoder == DecoderStageConfig(steps=1000, batch_size=16, lr=1e-4, warmup_steps=50, edge_weight=0.5,
                                                mse_weight=1.0, foreground_weight=5.0)
    assert config.export == ExportConfig(dtype="float16", cfg_scale=4.0) and config.metrics == MetricsConfig(512, 200)
    assert isinstance(config.vae.max_objects, int) and isinstance(config.vae.foreground_weight, float)


def edited_recipe(tmp_path: Path, old: str, new: str) -> Path:
    """configs/shapes.toml with its one line `old` replaced by `new`."""
    text = SHAPES_RECIPE.read_text(encoding="utf-8")
    line = re.compile(rf"(?m)^{re.escape(old)}(?!\w)")
    assert len(line.findall(text)) == 1, old
    path = tmp_path / "edited.toml"
    path.write_text(line.sub(new, text), encoding="utf-8")
    return path


@pytest.mark.parametrize("old, new, named", [
    ("kl_weight = 1e-5", "kl_wieght = 1e-5", "[vae] kl_wieght: unknown key; did you mean kl_weight?"),
    ("items = 20000", "itmes = 20000", "[data] itmes: unknown key; did you mean items?"),
    ("block_channels = [64", "block_chanels = [64",
     "[model.unet] block_chanels: unknown key; did you mean block_channels?"),
    ("seed = 0", "sed = 0", "sed: unknown key; did you mean seed?"),
    ("[tokenizer]", "[tokeniser]", "[tokeniser]: unknown key; did you mean tokenizer?"),
    ("steps = 800", 'steps = "800"', "[clip] steps: expected int, got '800' (str)"),
    ("batch_size = 64", "batch_size = 64.0", "[unet] batch_size: expected int, got 64.0 (float)"),
    ("lr = 5e-4", "lr = [5e-4]", "[unet] lr: expected float, got [0.0005] (list)"),
    ("layers_per_block = 2", "layers_per_block = true", "[model.unet] layers_per_block: expected int, got True (bool)"),
    ("attention_levels = [true", "attention_levels = [1", "[model.unet] attention_levels: expected a list of bool"),
    ("vocab_size = 1024", "", "[tokenizer] needs vocab_size"),
    ('dtype = "float16"', 'dtype = "f8"', "[export] dtype must be one of"),
])
def test_recipe_mistakes_name_the_file_and_the_key(tmp_path, old, new, named):
    path = edited_recipe(tmp_path, old, new)
    with pytest.raises(InvalidInputError) as error:
        RecipeConfig.from_file(path)
    assert str(error.value).startswith(f"{path}: ") and named in str(error.value), error.value


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(InvalidInputError) as error:
        RecipeConfig.from_file(edited_recipe(tmp_path, "items = 20000", "zzz = 20000"))
    assert str(error.value).endswith("[data] zzz: unknown key; valid keys: items, image_size")  # nothing close


def test_an_int_is_taken_where_a_float_belongs(tmp_path):
    config = RecipeConfig.from_file(edited_recipe(tmp_path, "lr = 5e-4", "lr = 1"))
    assert config.unet.lr == 1.0 and isinstance(config.unet.lr, float)


def test_model_config_from_dict_rejects_unknown_keys():
    assert ModelConfig.from_dict(TINY_SD1.to_dict()) == TINY_SD1
    with pytest.raises(InvalidInputError, match=r"model config: \[unet\] block_chanels: unknown key; did you mean"):
        ModelConfig.from_dict({"unet": {"block_chanels": [32, 64]}})


def test_recipe_runs_resumes_and_ships_a_loadable_model(tmp_path):
    config = toy_recipe(tmp_path)
    work = tmp_path / "work"
    run_recipe(config, work, until="vae")  # an interrupted run ...
    timings = json.loads((work / "timings.json").read_text())
    assert set(timings) == {"tokenizer", "vae"}
    model = run_recipe(config, work)  # ... finishes where it stopped
    timings = json.loads((work / "timings.json").read_text())
    assert set(timings) == set(STAGES) and all(t["done"] and t["seconds"] >= 0 for t in timings.values())
    assert timings["vae"]["steps"] == 2

    metrics = json.loads((work / "metrics.json").read_text())
    assert 0 <= metrics["clip_top1"] <= 1 and metrics["vae_psnr_held_out_pairs"] > 0
    assert set(metrics["vae_judged_fresh_held_in"]) <= {"small", "large"}

    pipe = sdtorch.load(model)
    recipe = Recipe(RecipeConfig.from_file(config), work)
    assert pipe.config.vae.scaling_factor == pytest.approx(recipe.model_config.vae.scaling_factor)
    assert pipe.tokenizer.vocab_size == pipe.config.text_encoder.vocab_size <= 1024
    unet = recipe.trained("unet")  # the shipped UNet holds the EMA weights, stored in float16
    ema = {k: v.half().float() for k, v in unet.ema["unet"].state_dict()["shadow"].items()}
    assert all(torch.equal(ema[k], v) for k, v in pipe.unet.state_dict().items())
    vae, decoder = recipe.trained("vae").models["vae"], recipe.trained("decoder").models["vae"]
    shipped = pipe.vae.state_dict()
    for name, tensor in decoder.state_dict().items():  # encoder from the vae stage, decoder fine-tuned after it
        assert torch.equal(shipped[name].float(), tensor.half().float()), name
        assert torch.equal(tensor, vae.state_dict()[name]) != name.startswith(("decoder.", "post_quant_conv.")), name
    image = pipe("a small red star in the top left", num_inference_steps=2, seed=0)[0]
    assert image.size == (64, 64)

    before = (work / "timings.json").read_text()
    run_recipe(config, work)  # everything done: nothing re-runs
    assert (work / "timings.json").read_text() == before


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot read recipe"):
        RecipeConfig.from_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = [", encoding="utf-8")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        RecipeConfig.from_file(bad)
    text = SHAPES_RECIPE.read_text(encoding="utf-8").replace("[clip]\nsteps = 800\n", "[clip]\n")
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(InvalidInputError, match=rf"^{re.escape(str(bad))}: \[clip\] needs steps$"):
        RecipeConfig.from_file(bad)
    bad.write_text(re.sub(r"(?ms)^\[data\].*?(?=^\[model\])", "", text), encoding="utf-8")
    with pytest.raises(InvalidInputError, match=rf"^{re.escape(str(bad))}: needs \[data\]$"):
        RecipeConfig.from_file(bad)
    with pytest.raises(InvalidInputError, match="unknown stage"):
        run_recipe(toy_recipe(tmp_path), tmp_path / "w", until="everything")


class _StandInVAE(torch.nn.Module):
    """Reconstructs perfectly, or (blank=True) as flat gray."""

    def __init__(self, blank: bool):
        super().__init__()
        self.blank = blank

    def encode(self, images):
        return DiagonalGaussian(torch.cat([images, torch.zeros_like(images)], dim=1))

    def decode(self, z):
        return torch.zeros_like(z) if self.blank else z


def test_vae_judged_separates_a_faithful_vae_from_a_blank_one():
    renders = ShapesDataset(48, seed=5, split="train")
    judge = load_judge()
    faithful = vae_judged(_StandInVAE(blank=False), renders, judge)
    blank = vae_judged(_StandInVAE(blank=True), renders, judge)
    assert set(faithful) == set(blank) == {"small", "large"}
    assert all(acc == 1.0 for size in faithful.values() for acc in size.values()), faithful
    assert all(blank[size]["shape"] < 0.5 and blank[size]["colour"] < 0.5 for size in blank), blank


def test_a_recipe_without_a_decoder_stage_ships_the_vae_stage_vae(tmp_path):
    config = toy_recipe(tmp_path)
    text = re.sub(r"(?ms)^\[decoder\].*?(?=^\[clip\])", "", config.read_text(encoding="utf-8"))
    config.write_text(text, encoding="utf-8")
    recipe = Recipe(RecipeConfig.from_file(config), tmp_path / "work")
    assert recipe.config.decoder is None
    recipe.run(until="decoder")
    assert json.loads((recipe.workdir / "timings.json").read_text())["decoder"]["skipped"]
    assert not (recipe.workdir / "decoder").exists()
    trained = recipe.trained("vae").models["vae"].state_dict()
    assert all(torch.equal(t, trained[k]) for k, t in recipe.vae().state_dict().items())


@pytest.mark.parametrize("setting", ["foreground_weight = 5.0", "max_objects = 4"])
def test_vae_stage_settings_change_what_it_learns(tmp_path, setting):
    """foreground_weight weighs the object's pixels up; max_objects trains on scenes of several objects."""

    def vae_after_training(extra: str, name: str) -> dict[str, torch.Tensor]:
        lines, section = [], None
        for line in toy_recipe(tmp_path).read_text("utf-8").splitlines(keepends=True):
            section = line.strip() if line.startswith("[") else section
            if not (section == "[vae]" and line.split(" = ")[0] in ("foreground_weight", "max_objects")):
                lines.append(line)
        text = "".join(lines)
        (tmp_path / f"{name}.toml").write_text(text.replace("[vae]\n", f"[vae]\n{extra}\n", 1), encoding="utf-8")
        recipe = Recipe(RecipeConfig.from_file(tmp_path / f"{name}.toml"), tmp_path / name)
        recipe.run(until="vae")
        return recipe.trained("vae").models["vae"].state_dict()

    plain, again, changed = (vae_after_training(e, n) for e, n in [("", "a"), ("", "b"), (setting, "c")])
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # deterministic, so a difference is the setting's
    assert not all(torch.equal(plain[k], changed[k]) for k in plain)


def test_an_adopted_vae_is_the_vae_stage_the_decoder_stage_starts_from(tmp_path):
    recipe = Recipe(RecipeConfig.from_file(toy_recipe(tmp_path)), tmp_path / "work")
    torch.manual_seed(5)
    adopted = AutoencoderKL(recipe.config.model.vae)
    recipe.adopt_vae(adopted, "a test")
    recipe.adopt_vae(AutoencoderKL(recipe.config.model.vae), "another")  # the vae stage exists: left as it is
    recipe.run(until="decoder")
    stage_vae = recipe.trained("vae").models["vae"].state_dict()
    assert all(torch.equal(t, stage_vae[k]) for k, t in adopted.state_dict().items())
    tuned = recipe.vae().state_dict()
    encoder = [k for k in tuned if not k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(tuned[k], stage_vae[k]) for k in encoder)  # frozen in the decoder stage
    assert not all(torch.equal(tuned[k], stage_vae[k]) for k in tuned if k.startswith("decoder."))
    timings = json.loads((recipe.workdir / "timings.json").read_text())
    assert timings["vae"]["adopted_from"] == "a test" and timings["decoder"]["done"]
    assert timings["tokenizer"]["done"] and (recipe.workdir / "tokenizer").is_dir()  # trained as usual
