"""scripts/teach_hexagon.py at toy size: the plumbing (data folder, LoRA export, report, grid), not the quality."""

import importlib.util
import json
import random
from pathlib import Path

import PIL.Image
import pytest

from sdtorch.data import shapes

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "teach_hexagon.py"


@pytest.fixture(scope="module")
def teach():
    spec = importlib.util.spec_from_file_location("teach_hexagon", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hexagon_captions_and_prompts(teach):
    rng = random.Random(0)
    for _ in range(50):
        attrs = teach.hexagon_attributes(rng)
        text = teach.hexagon_caption(attrs, rng)
        assert "hexagon" in text and "square" not in text
        parsed = shapes.parse_prompt(text)
        assert parsed["colour"] == attrs.colour and parsed["size"] == attrs.size
        assert parsed["position"] == attrs.position and "shape" not in parsed
    prompts = teach.hexagon_prompts(6, seed=3)
    assert [p.text for p in prompts] == [p.text for p in teach.hexagon_prompts(6, seed=3)]  # seed-fixed
    assert all(p.intended["shape"] == "hexagon" and "position" in p.intended for p in prompts)


def test_training_folder(teach, tmp_path):
    counts = teach.write_training_folder(tmp_path / "data", hexagons=3, ordinary=2)
    assert counts == {"hexagon_images": 3, "ordinary_images": 2}
    pngs = sorted((tmp_path / "data").glob("*.png"))
    assert len(pngs) == 5 and all(p.with_suffix(".txt").is_file() for p in pngs)
    hexagon_captions = [p.with_suffix(".txt").read_text() for p in pngs if p.name.startswith("hexagon_")]
    assert len(hexagon_captions) == 3 and all("hexagon" in c for c in hexagon_captions)


@pytest.mark.parametrize("method, extra, result", [
    ("lora", ["--ordinary", "2", "--rank", "2"], "lora.safetensors"),
    ("textual-inversion", [], "hexagon.safetensors"),
    ("dreambooth", ["--class-images", "2", "--no-dreambooth-lora", "--lr", "1e-5"], "model"),
])
def test_toy_run_writes_report_and_grid(teach, tmp_path, one_thread, method, extra, result):
    workdir, grid = tmp_path / "run", tmp_path / "grid.png"
    report = teach.main(["--method", method, "--workdir", str(workdir), "--hexagons", "2", "--steps", "3",
                         "--batch-size", "2", "--warmup-steps", "0", "--hexagon-prompts", "4", "--eval-count", "2",
                         "--eval-held-out", "1", "--grid", str(grid), "--grid-columns", "4", "--no-progress", *extra])
    assert (workdir / "out" / result).exists() and report["result"] == str(workdir / "out" / result)
    assert grid.is_file() and (workdir / "grid.png").is_file()
    saved = json.loads((workdir / "report.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"])) and saved["method"] == method
    for key in ("hexagon_rate_base", "hexagon_rate_tuned", "base_all_correct_base", "base_all_correct_tuned",
                "base_all_correct_drop_points", "train_wall_s", "targets_met"):
        assert key in saved["summary"]
    assert saved["summary"]["base_prompts"] == 3 and saved["summary"]["hexagon_prompts"] == 4
    for label in ("base", "tuned"):
        assert saved["results"][label]["hexagon"]["n"] == 4
        assert saved["results"][label]["base_concepts"]["guided"]["all"]["n"] == 3
    assert saved["training"]["settings"]["steps"] == 3 and saved["timings_s"]["train_wall"] > 0
    if method == "dreambooth":  # class images drawn once, captioned with their prompts
        captions = sorted((workdir / "class_images").glob("*.txt"))
        assert len(captions) == 2 and all(c.read_text().strip() for c in captions)
    if method == "textual-inversion":  # trained on hexagon captions only: the embedding changes no other prompt
        assert saved["data"]["ordinary_images"] == 0
        assert saved["results"]["base"]["base_concepts"] == saved["results"]["tuned"]["base_concepts"]


def test_class_renders_are_the_world_drawing_the_generated_class_prompts(teach, tmp_path):
    renders = teach.class_folder(tmp_path, "renders")
    assert renders != teach.class_folder(tmp_path, "generated")  # the two sources never share a cache
    teach.write_class_renders(renders, 3, seed=0)
    captions = [p.with_suffix(".txt").read_text().strip() for p in sorted(renders.glob("*.png"))]
    world = shapes.ShapesDataset(3, seed=2000, split="train")  # the prompts write_class_images draws
    assert captions == [world.describe(i)[1] for i in range(3)]
    first = shapes.render(world.describe(0)[0])
    assert first.convert("RGB").tobytes() == PIL.Image.open(renders / "class_00000.png").convert("RGB").tobytes()
