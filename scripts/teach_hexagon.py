"""Teach the built-in shapes model the hexagon with a LoRA, and measure what it learned and what it kept.

The shapes world never draws a hexagon (`shapes.SHAPES` leaves it out; `shapes.render(..., shape="hexagon")`
draws one in the world's style) and the built-in model (`sdtorch.load()`) has never seen one. This script:

  1. writes a training folder (`<workdir>/data`, images + same-name .txt captions): `--hexagons` hexagon
     renders (colour, size, position, background drawn as the world draws them) captioned in the world's
     own phrasings with "hexagon" as the shape word, plus `--ordinary` ordinary shapes-world renders with
     their captions (prior preservation in spirit; the default mix is 50/50, 400 + 400);
  2. fine-tunes a LoRA on it (defaults: rank 8, alpha 8, "transformer" targets on the UNet plus the text
     encoder, AdamW lr 1e-3, 50 warm-up steps then cosine, batch 8, 2000 steps, cached latents: about
     11-12 min on a shared 2-core CPU) through the finetune API (`FineTuneConfig` / `finetune`, the code
     behind `sdtorch finetune --method lora`) into `<workdir>/lora`, timing the whole call (model load, latent
     cache and training) as the training wall time;
  3. evaluates the base model and the base model + LoRA on the same prompts and seeds:
       - `--hexagon-prompts` hexagon prompts (world phrasings, seed-fixed), judged by the attribute judge
         (`evaluation.judge`): the share read as a hexagon and the share with every named attribute right;
       - the base concepts exactly as `sdtorch eval` measures them (`evaluation.generation.evaluate`:
         `--eval-count` held-in + `--eval-held-out` held-out prompts, DPM++ 2M Karras, 20 steps, CFG 4);
  4. writes `<workdir>/report.json` (figures, timings, settings) and a sample grid (`--grid`, default
     docs/hexagon-lora.png): hexagon prompts, top row without the LoRA, bottom row with it.

    .venv/bin/python scripts/teach_hexagon.py --workdir runs/hexagon
    .venv/bin/python scripts/teach_hexagon.py --workdir runs/hexagon --skip-train   # re-evaluate the LoRA there

Everything is seeded; the LoRA folder is written afresh unless --skip-train (finetune would resume it).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw

import sdtorch
from sdtorch.data import shapes
from sdtorch.evaluation.generation import EvalPrompt, evaluate, format_report, generate_and_score
from sdtorch.evaluation.judge import load_judge
from sdtorch.training.datasets import DatasetConfig
from sdtorch.training.finetune import FineTuneConfig, finetune

HEXAGON = "hexagon"
_PLACEHOLDER = "square"  # the shape a hexagon's Attributes carry: its only caption word is "square", swapped out
SAMPLING = dict(steps=20, sampler="DPM++ 2M", schedule="Karras", guidance_scale=4.0)  # as `sdtorch eval`


# ----------------------------------------------------------------------------- data


def hexagon_attributes(rng: random.Random) -> shapes.Attributes:
    """A hexagon picture's attributes, drawn as the world draws any shape's (any colour, size, position, a
    background it stands out on); the shape field holds a placeholder, since `Attributes` only takes SHAPES."""
    colour = rng.choice(tuple(shapes.COLOURS))
    return shapes.Attributes(shape=_PLACEHOLDER, colour=colour, size=rng.choice(shapes.SIZES),
                             position=rng.choice(shapes.POSITIONS),
                             background=rng.choice(shapes.allowed_backgrounds(colour)))


def hexagon_caption(attrs: shapes.Attributes, rng: random.Random) -> str:
    """A caption in one of the world's phrasings (`shapes.caption`) with "hexagon" as the shape word."""
    return re.sub(rf"\b{_PLACEHOLDER}\b", HEXAGON, shapes.caption(attrs, rng))


def hexagon_prompts(count: int, seed: int = 0) -> list[EvalPrompt]:
    """`count` seed-fixed hexagon prompts with the attributes the judge checks (shape, colour, size, position)."""
    rng = random.Random(f"teach_hexagon.eval:{seed}")
    prompts = []
    for _ in range(count):
        text = hexagon_caption(hexagon_attributes(rng), rng)
        intended = {**shapes.parse_prompt(text), "shape": HEXAGON}  # parse_prompt does not know the word
        prompts.append(EvalPrompt(text, intended, held_out=True))
    return prompts


def write_training_folder(folder: Path, hexagons: int, ordinary: int, seed: int = 0) -> dict[str, int]:
    """`hexagons` hexagon renders and `ordinary` shapes-world renders (train split), each `name.png` + `name.txt`."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i in range(hexagons):
        rng = random.Random(f"teach_hexagon.data:{seed}:{i}")
        attrs = hexagon_attributes(rng)
        shapes.render(attrs, shape=HEXAGON).save(folder / f"hexagon_{i:05d}.png")
        (folder / f"hexagon_{i:05d}.txt").write_text(hexagon_caption(attrs, rng) + "\n", encoding="utf-8")
    world = shapes.ShapesDataset(ordinary, seed=1000 + seed, split="train")
    for i in range(ordinary):
        attrs, text = world.describe(i)
        shapes.render(attrs).save(folder / f"shape_{i:05d}.png")
        (folder / f"shape_{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
    return {"hexagon_images": hexagons, "ordinary_images": ordinary}


# ----------------------------------------------------------------------------- training


def train_lora(data: Path, out: Path, settings: dict[str, Any]) -> tuple[Path, float]:
    """Fine-tune a LoRA on `data` into `out` (afresh); returns (the kohya file, wall seconds of the whole call)."""
    if out.exists():
        shutil.rmtree(out)
    dataset = DatasetConfig(folder=str(data), resolution=64, cache_latents=True, seed=settings["seed"])
    config = FineTuneConfig(dataset=dataset, out=str(out), method="lora", steps=settings["steps"],
                            batch_size=settings["batch_size"], lr=settings["lr"], lr_scheduler=settings["lr_scheduler"],
                            warmup_steps=settings["warmup_steps"], rank=settings["rank"], alpha=settings["alpha"],
                            lora_targets=settings["targets"], train_text_encoder=settings["train_text_encoder"],
                            checkpoint_every=max(settings["steps"], 1), log_every=max(settings["steps"] // 50, 1),
                            seed=settings["seed"], progress=settings.get("progress", True))
    started = time.perf_counter()
    path = finetune(config)
    return path, time.perf_counter() - started


# ----------------------------------------------------------------------------- evaluation


def hexagon_scores(pipe: sdtorch.Pipeline, prompts: list[EvalPrompt], judge, seed: int) -> tuple[dict, list]:
    """Judge one image per hexagon prompt: {"hexagon_rate", "all_correct", "accuracy", "n"} and the images."""
    result = generate_and_score(pipe, prompts, judge, seed=seed, guidance_scale=SAMPLING["guidance_scale"],
                                steps=SAMPLING["steps"], sampler=SAMPLING["sampler"], schedule=SAMPLING["schedule"])
    images = result.pop("images")
    scores = result["all"]
    return {"n": scores["n"], "hexagon_rate": scores["accuracy"]["shape"], "all_correct": scores["all_correct"],
            "accuracy": scores["accuracy"]}, images


def base_scores(pipe: sdtorch.Pipeline, count: int, held_out: int, judge, seed: int) -> dict:
    """The base concepts as `sdtorch eval` scores them (guided only)."""
    return evaluate(pipe, count, held_out, seed=seed, guidance_scale=SAMPLING["guidance_scale"],
                    compare_guidance=False, judge=judge, steps=SAMPLING["steps"], sampler=SAMPLING["sampler"],
                    schedule=SAMPLING["schedule"])


def sample_grid(rows: dict[str, list[PIL.Image.Image]], scale: int = 2, gap: int = 2) -> PIL.Image.Image:
    """One labelled row per entry of `rows` (images upscaled `scale` x, nearest)."""
    label_w = 90
    tile = 64 * scale
    columns = max(len(r) for r in rows.values())
    grid = PIL.Image.new("RGB", (label_w + columns * (tile + gap), len(rows) * (tile + gap)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        y = r * (tile + gap)
        draw.text((4, y + tile // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((tile, tile), PIL.Image.NEAREST), (label_w + c * (tile + gap), y))
    return grid


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/hexagon")
    p.add_argument("--hexagons", type=int, default=400, help="hexagon training images")
    p.add_argument("--ordinary", type=int, default=400, help="ordinary shapes-world training images (prior)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-scheduler", default="cosine")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--targets", default="transformer", help="attention | transformer | locon")
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="also a LoRA on the text encoder (run 2: kept the base drop under 5 points)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--hexagon-prompts", type=int, default=100)
    p.add_argument("--eval-count", type=int, default=500, help="held-in base prompts (sdtorch eval: 500)")
    p.add_argument("--eval-held-out", type=int, default=100, help="held-out base prompts (sdtorch eval: 100)")
    p.add_argument("--grid", default="docs/hexagon-lora.png", help="sample grid PNG ('' : only <workdir>/grid.png)")
    p.add_argument("--grid-columns", type=int, default=10)
    p.add_argument("--skip-train", action="store_true", help="evaluate the LoRA already in <workdir>/lora")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_scheduler=args.lr_scheduler,
                    warmup_steps=args.warmup_steps, rank=args.rank, alpha=args.alpha, targets=args.targets,
                    train_text_encoder=args.train_text_encoder, seed=args.seed, progress=not args.no_progress)
    report: dict[str, Any] = {"command": " ".join(["scripts/teach_hexagon.py", *(argv or sys.argv[1:])]),
                              "training": {"settings": settings}, "timings_s": {}}
    timings = report["timings_s"]

    started = time.perf_counter()
    data = workdir / "data"
    lora_dir = workdir / "lora"
    if not args.skip_train:
        report["data"] = {**write_training_folder(data, args.hexagons, args.ordinary, args.seed), "folder": str(data)}
        timings["write_data"] = time.perf_counter() - started
        lora_path, seconds = train_lora(data, lora_dir, settings)
        timings["train_wall"] = seconds
        report["training"]["images_seen"] = args.steps * args.batch_size
    else:
        lora_path = lora_dir / "lora.safetensors"
        previous = workdir / "report.json"
        if previous.is_file():  # keep the figures of the run that trained this LoRA
            old = json.loads(previous.read_text(encoding="utf-8"))
            report["training"], report["data"] = old.get("training", {}), old.get("data")
            timings["train_wall"] = old.get("timings_s", {}).get("train_wall")
    report["lora"] = str(lora_path)

    judge = load_judge()
    pipe = sdtorch.load()
    prompts = hexagon_prompts(args.hexagon_prompts, args.seed)
    report["hexagon_prompts_sample"] = [p.text for p in prompts[:5]]
    results: dict[str, Any] = {}
    grid_rows: dict[str, list] = {}
    for label, scale in (("base", None), ("lora", args.lora_scale)):
        if scale is not None:
            pipe.load_lora(lora_path, scale)
        t = time.perf_counter()
        hexagon, images = hexagon_scores(pipe, prompts, judge, args.seed)
        timings[f"eval_hexagon_{label}"] = time.perf_counter() - t
        t = time.perf_counter()
        base = base_scores(pipe, args.eval_count, args.eval_held_out, judge, args.seed)
        timings[f"eval_base_{label}"] = time.perf_counter() - t
        results[label] = {"hexagon": hexagon, "base_concepts": base}
        grid_rows["no LoRA" if scale is None else f"LoRA x{scale:g}"] = images[: args.grid_columns]
        print(f"[{label}] hexagon read as hexagon {100 * hexagon['hexagon_rate']:.1f}% "
              f"(all correct {100 * hexagon['all_correct']:.1f}%) of {hexagon['n']}\n{format_report(base)}", flush=True)
    report["results"] = results
    base_drop = (results["base"]["base_concepts"]["guided"]["all"]["all_correct"]
                 - results["lora"]["base_concepts"]["guided"]["all"]["all_correct"])
    report["summary"] = {
        "hexagon_rate_without_lora": results["base"]["hexagon"]["hexagon_rate"],
        "hexagon_rate_with_lora": results["lora"]["hexagon"]["hexagon_rate"],
        "hexagon_all_correct_without_lora": results["base"]["hexagon"]["all_correct"],
        "hexagon_all_correct_with_lora": results["lora"]["hexagon"]["all_correct"],
        "base_all_correct_without_lora": results["base"]["base_concepts"]["guided"]["all"]["all_correct"],
        "base_all_correct_with_lora": results["lora"]["base_concepts"]["guided"]["all"]["all_correct"],
        "base_all_correct_drop_points": 100 * base_drop,
        "base_prompts": args.eval_count + args.eval_held_out,
        "hexagon_prompts": args.hexagon_prompts,
        "train_wall_s": timings.get("train_wall"),
        "targets_met": {
            "hexagon_rate_ge_80": results["lora"]["hexagon"]["hexagon_rate"] >= 0.8,
            "base_drop_le_5_points": 100 * base_drop <= 5,
            "train_le_15_min": (timings.get("train_wall") or 0) <= 900,
        },
    }
    report["sampling"] = SAMPLING
    grid = sample_grid(grid_rows)
    grid.save(workdir / "grid.png")
    report["grid"] = [str(workdir / "grid.png")]
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        report["grid"].append(args.grid)
    timings["total"] = time.perf_counter() - started
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
