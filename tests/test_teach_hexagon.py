"""scripts/teach_hexagon.py at toy size: the plumbing (data folder, LoRA export, report, grid), not the quality."""

import importlib.util
import json
import random
from pathlib import Path

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


def test_toy_run_writes_report_and_grid(teach, tmp_path, one_thread):
    workdir, grid = tmp_path / "run", tmp_path / "grid.png"
    report = teach.main(["--workdir", str(workdir), "--hexagons", "2", "--ordinary", "2", "--steps", "3",
                         "--batch-size", "2", "--warmup-steps", "0", "--rank", "2", "--hexagon-prompts", "4",
                         "--eval-count", "2", "--eval-held-out", "1", "--grid", str(grid), "--grid-columns", "4",
                         "--no-progress"])
    assert (workdir / "lora" / "lora.safetensors").is_file()
    assert grid.is_file() and (workdir / "grid.png").is_file()
    saved = json.loads((workdir / "report.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    for key in ("hexagon_rate_without_lora", "hexagon_rate_with_lora", "base_all_correct_without_lora",
                "base_all_correct_with_lora", "base_all_correct_drop_points", "train_wall_s", "targets_met"):
        assert key in saved["summary"]
    assert saved["summary"]["base_prompts"] == 3 and saved["summary"]["hexagon_prompts"] == 4
    for label in ("base", "lora"):
        assert saved["results"][label]["hexagon"]["n"] == 4
        assert saved["results"][label]["base_concepts"]["guided"]["all"]["n"] == 3
    assert saved["training"]["settings"]["steps"] == 3 and saved["timings_s"]["train_wall"] > 0
