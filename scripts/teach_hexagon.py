"""Teach the built-in shapes model the hexagon (with a LoRA, textual inversion or DreamBooth) and measure what
it learned and what it kept.

The shapes world never draws a hexagon (`shapes.SHAPES` leaves it out; `shapes.render(..., shape="hexagon")`
draws one in the world's style) and the built-in model (`sdtorch.load()`) has never seen one. This script:

  1. writes a training folder (`<workdir>/data`, images + same-name .txt captions): `--hexagons` hexagon
     renders (colour, size, position, background drawn as the world draws them) captioned in the world's
     own phrasings with "hexagon" as the shape word, plus `--ordinary` ordinary shapes-world renders with
     their captions (for the LoRA: prior preservation in spirit; the default mix is 50/50, 400 + 400);
  2. fine-tunes through the finetune API (`FineTuneConfig` / `finetune`, the code behind `sdtorch finetune`)
     into `<workdir>/out`, timing the whole call (model load, latent cache and training; DreamBooth's class
     images are drawn before it, timed apart, and reused by later runs):
       lora                 rank 8, alpha 8, `--targets` layers (default locon: transformers, ResBlocks and
                            samplers) of the UNet plus the text encoder, AdamW lr
                            1e-3, 50 warm-up steps then cosine, batch 8, cached latents;
       textual-inversion    an embedding named "hexagon" (so the prompts' own word picks it), `--num-vectors`
                            vectors from `--init-word`, trained on the hexagon captions ("[filewords]"),
                            A1111's settings (lr 5e-3, no weight decay, no clipping), hexagons only;
       dreambooth           `--dreambooth-lora` or the whole UNet on the hexagons (their own captions), with
                            prior preservation: `--class-images` class images the base model draws (cached
                            in `<workdir>/class_images`, captioned, from ordinary world prompts), or with
                            `--class-source renders` the world's own renders of those prompts (kohya-style
                            regularisation pictures, in `<workdir>/class_renders`);
  3. evaluates the base model and the tuned one on the same prompts and seeds:
       - `--hexagon-prompts` hexagon prompts (world phrasings, seed-fixed), judged by the attribute judge
         (`evaluation.judge`): the share read as a hexagon and the share with every named attribute right;
       - the base concepts exactly as `sdtorch eval` measures them (`evaluation.generation.evaluate`:
         `--eval-count` held-in + `--eval-held-out` held-out prompts, DPM++ 2M Karras, 20 steps, CFG 4);
  4. writes `<workdir>/report.json` (figures, timings, settings) and a sample grid (`--grid`, default
     docs/hexagon-<method>.png): hexagon prompts, top row the base model, bottom row the tuned one.

    .venv/bin/python scripts/teach_hexagon.py --method lora --workdir runs/hexagon
    .venv/bin/python scripts/teach_hexagon.py --method lora --workdir runs/hexagon --skip-train  # re-evaluate

Everything is seeded; `<workdir>/out` is written afresh unless --skip-train (finetune would resume it).
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
from sdtorch.training.dreambooth import DreamBoothConfig
from sdtorch.training.finetune import FineTuneConfig, finetune
from sdtorch.training.textual_inversion import TextualInversionConfig

HEXAGON = "hexagon"
_PLACEHOLDER = "square"  # the shape a hexagon's Attributes carry: its only caption word is "square", swapped out
SAMPLING = dict(steps=20, sampler="DPM++ 2M", schedule="Karras", guidance_scale=4.0)  # as `sdtorch eval`
METHODS = ("lora", "textual-inversion", "dreambooth")
# each method's defaults where they differ (None in parse_args): (lr, ordinary images)
METHOD_DEFAULTS = {"lora": (1e-3, 400), "textual-inversion": (5e-3, 0), "dreambooth": (1e-3, 0)}


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


def write_class_images(folder: Path, count: int, guidance_scale: float, seed: int = 0) -> None:
    """DreamBooth's class images: the base model's pictures for `count` ordinary world prompts at CFG
    `guidance_scale`, each captioned with its prompt (finetune keeps a class image's own caption), unless the
    folder holds them already."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    pipe = sdtorch.load()
    world = shapes.ShapesDataset(count, seed=2000 + seed, split="train")
    for i in range(count):
        _, text = world.describe(i)
        image = pipe(text, seed=seed + i, steps=SAMPLING["steps"], sampler=SAMPLING["sampler"],
                     schedule=SAMPLING["schedule"], cfg_scale=guidance_scale)[0]
        image.save(folder / f"class_{i:05d}.png")
        (folder / f"class_{i:05d}.txt").write_text(text + "\n", encoding="utf-8")


def write_class_renders(folder: Path, count: int, seed: int = 0) -> None:
    """DreamBooth's class images as the world's own renders of the prompts `write_class_images` draws."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= count:
        return
    folder.mkdir(parents=True, exist_ok=True)
    world = shapes.ShapesDataset(count, seed=2000 + seed, split="train")
    for i in range(count):
        attrs, text = world.describe(i)
        shapes.render(attrs).save(folder / f"class_{i:05d}.png")
        (folder / f"class_{i:05d}.txt").write_text(text + "\n", encoding="utf-8")


def class_folder(workdir: Path, source: str) -> Path:
    return workdir / ("class_images" if source == "generated" else "class_renders")


def training_config(method: str, data: Path, out: Path, workdir: Path, settings: dict[str, Any]) -> FineTuneConfig:
    """The finetune config of `method` with the script's settings."""
    dataset = DatasetConfig(folder=str(data), resolution=64, cache_latents=True, seed=settings["seed"])
    common = dict(dataset=dataset, out=str(out), method=method, steps=settings["steps"],
                  batch_size=settings["batch_size"], lr=settings["lr"], lr_scheduler=settings["lr_scheduler"],
                  warmup_steps=settings["warmup_steps"], checkpoint_every=max(settings["steps"], 1),
                  log_every=max(settings["steps"] // 50, 1), seed=settings["seed"])
    lora = dict(rank=settings["rank"], alpha=settings["alpha"], lora_targets=settings["targets"],
                train_text_encoder=settings["train_text_encoder"])
    if method == "lora":
        return FineTuneConfig(**common, **lora, progress=settings.get("progress", True))
    if method == "textual-inversion":
        ti = TextualInversionConfig(name=HEXAGON, init_word=settings["init_word"], num_vectors=settings["num_vectors"],
                                    templates=("[filewords]",), formats=("a1111_safetensors",))
        return FineTuneConfig(**common, textual_inversion=ti, weight_decay=0.0, max_grad_norm=0.0,
                              progress=settings.get("progress", True))
    dreambooth = DreamBoothConfig(class_prompt="a shape", class_dir=str(class_folder(workdir, settings["class_source"])),
                                  num_class_images=settings["class_images"], lora=settings["dreambooth_lora"],
                                  prior_loss_weight=settings["prior_loss_weight"])
    extra = lora if settings["dreambooth_lora"] else dict(train_text_encoder=settings["train_text_encoder"])
    return FineTuneConfig(**common, **extra, dreambooth=dreambooth, progress=settings.get("progress", True))


def train(method: str, data: Path, out: Path, workdir: Path, settings: dict[str, Any]) -> tuple[Path, float]:
    """Fine-tune on `data` into `out` (afresh); returns (the main export, wall seconds of the finetune call)."""
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    path = finetune(training_config(method, data, out, workdir, settings))
    return path, time.perf_counter() - started


def tuned_pipeline(method: str, path: Path, scale: float) -> sdtorch.Pipeline:
    """The base model with what `method` trained (a LoRA at `scale`, the embedding), or the tuned model."""
    if path.is_dir():  # a full fine-tune's diffusers folder
        return sdtorch.load(path)
    pipe = sdtorch.load()
    if method == "textual-inversion":
        pipe.load_embedding(path)
    else:
        pipe.load_lora(path, scale)
    return pipe


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
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--workdir", default="runs/hexagon")
    p.add_argument("--hexagons", type=int, default=400, help="hexagon training images")
    p.add_argument("--ordinary", type=int, help="ordinary shapes-world training images (lora: 400, else 0)")
    p.add_argument("--steps", type=int, default=1900)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, help="lora and dreambooth: 1e-3 (dreambooth without --dreambooth-lora: "
                   "give a smaller one), textual-inversion 5e-3")
    p.add_argument("--lr-scheduler", default="cosine")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--targets", default="locon", help="attention | transformer | locon")
    p.add_argument("--train-text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the text encoder (a LoRA on it, or all of it for a full DreamBooth)")
    p.add_argument("--init-word", default="circle", help="textual inversion: the vectors' starting word")
    p.add_argument("--num-vectors", type=int, default=2, help="textual inversion: vectors of the embedding")
    p.add_argument("--dreambooth-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="dreambooth: train a LoRA (else the whole UNet)")
    p.add_argument("--class-images", type=int, default=400, help="dreambooth: class images for prior preservation")
    p.add_argument("--class-source", choices=("generated", "renders"), default="generated",
                   help="dreambooth: class images drawn by the base model, or the world's renders of the same prompts")
    p.add_argument("--class-guidance", type=float, default=1.0,
                   help="dreambooth: the CFG scale the class images are drawn at (1: the model's own conditional "
                        "distribution, which training on them leaves in place)")
    p.add_argument("--prior-loss-weight", type=float, default=1.0, help="dreambooth: weight of the class images' loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--hexagon-prompts", type=int, default=100)
    p.add_argument("--eval-count", type=int, default=500, help="held-in base prompts (sdtorch eval: 500)")
    p.add_argument("--eval-held-out", type=int, default=100, help="held-out base prompts (sdtorch eval: 100)")
    p.add_argument("--grid", help="sample grid PNG (default docs/hexagon-<method>.png; '': only <workdir>/grid.png)")
    p.add_argument("--grid-columns", type=int, default=10)
    p.add_argument("--skip-train", action="store_true", help="evaluate what <workdir>/out holds")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    lr, ordinary = METHOD_DEFAULTS[args.method]
    args.lr = lr if args.lr is None else args.lr
    args.ordinary = ordinary if args.ordinary is None else args.ordinary
    args.grid = f"docs/hexagon-{args.method}.png" if args.grid is None else args.grid
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_scheduler=args.lr_scheduler,
                    warmup_steps=args.warmup_steps, rank=args.rank, alpha=args.alpha, targets=args.targets,
                    train_text_encoder=args.train_text_encoder, init_word=args.init_word,
                    num_vectors=args.num_vectors, dreambooth_lora=args.dreambooth_lora,
                    class_images=args.class_images, class_source=args.class_source,
                    class_guidance=args.class_guidance,
                    prior_loss_weight=args.prior_loss_weight, seed=args.seed,
                    progress=not args.no_progress)
    report: dict[str, Any] = {"command": " ".join(["scripts/teach_hexagon.py", *(argv or sys.argv[1:])]),
                              "method": args.method, "training": {"settings": settings}, "timings_s": {}}
    timings = report["timings_s"]

    started = time.perf_counter()
    data = workdir / "data"
    out = workdir / "out"
    if not args.skip_train:
        report["data"] = {**write_training_folder(data, args.hexagons, args.ordinary, args.seed), "folder": str(data)}
        timings["write_data"] = time.perf_counter() - started
        if args.method == "dreambooth":  # made once and cached in the workdir, timed apart
            t = time.perf_counter()
            folder = class_folder(workdir, args.class_source)
            if args.class_source == "generated":
                write_class_images(folder, args.class_images, args.class_guidance, args.seed)
            else:
                write_class_renders(folder, args.class_images, args.seed)
            timings["class_images"] = time.perf_counter() - t
        path, seconds = train(args.method, data, out, workdir, settings)
        timings["train_wall"] = seconds
        report["training"]["images_seen"] = args.steps * args.batch_size
    else:
        path = next(p for p in (out / "lora.safetensors", out / f"{HEXAGON}.safetensors", out / "model") if p.exists())
        previous = workdir / "report.json"
        if previous.is_file():  # keep the figures of the run that trained it
            old = json.loads(previous.read_text(encoding="utf-8"))
            report["training"], report["data"] = old.get("training", {}), old.get("data")
            timings["train_wall"] = old.get("timings_s", {}).get("train_wall")
    report["result"] = str(path)

    judge = load_judge()
    prompts = hexagon_prompts(args.hexagon_prompts, args.seed)
    report["hexagon_prompts_sample"] = [p.text for p in prompts[:5]]
    results: dict[str, Any] = {}
    grid_rows: dict[str, list] = {}
    for label in ("base", "tuned"):
        pipe = sdtorch.load() if label == "base" else tuned_pipeline(args.method, path, args.lora_scale)
        t = time.perf_counter()
        hexagon, images = hexagon_scores(pipe, prompts, judge, args.seed)
        timings[f"eval_hexagon_{label}"] = time.perf_counter() - t
        t = time.perf_counter()
        base = base_scores(pipe, args.eval_count, args.eval_held_out, judge, args.seed)
        timings[f"eval_base_{label}"] = time.perf_counter() - t
        results[label] = {"hexagon": hexagon, "base_concepts": base}
        grid_rows["base model" if label == "base" else args.method] = images[: args.grid_columns]
        print(f"[{label}] hexagon read as hexagon {100 * hexagon['hexagon_rate']:.1f}% "
              f"(all correct {100 * hexagon['all_correct']:.1f}%) of {hexagon['n']}\n{format_report(base)}", flush=True)
    report["results"] = results
    base_before = results["base"]["base_concepts"]["guided"]["all"]["all_correct"]
    base_after = results["tuned"]["base_concepts"]["guided"]["all"]["all_correct"]
    report["summary"] = {
        "method": args.method,
        "hexagon_rate_base": results["base"]["hexagon"]["hexagon_rate"],
        "hexagon_rate_tuned": results["tuned"]["hexagon"]["hexagon_rate"],
        "hexagon_all_correct_base": results["base"]["hexagon"]["all_correct"],
        "hexagon_all_correct_tuned": results["tuned"]["hexagon"]["all_correct"],
        "base_all_correct_base": base_before,
        "base_all_correct_tuned": base_after,
        "base_all_correct_drop_points": 100 * (base_before - base_after),
        "base_prompts": args.eval_count + args.eval_held_out,
        "hexagon_prompts": args.hexagon_prompts,
        "train_wall_s": timings.get("train_wall"),
        "targets_met": {
            "hexagon_rate_ge_80": results["tuned"]["hexagon"]["hexagon_rate"] >= 0.8,
            "base_drop_le_5_points": 100 * (base_before - base_after) <= 5,
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
