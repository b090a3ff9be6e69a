"""Train a ControlNet for the built-in shapes model whose condition is a render's edge map, and measure it.

The shapes world (`sdtorch.data.shapes`) draws one shape of a colour, size and position on a background. This
script:

  1. writes a training folder (`<workdir>/data`: `--pairs` renders of the whole world, each captioned with its
     colour only, "a red shape", and `<workdir>/conditions`: each render's canny edge map, as the A1111
     ControlNet extension's "canny" preprocessor makes it at 64 px; with `--mask-weight W`, `<workdir>/masks-W`:
     loss masks white on the shape's square and MASK_MARGIN px around it, 1/W grey elsewhere, so the denoising
     loss weighs the shape's latents W times the background's);
  2. trains a ControlNet from the base UNet's encoder (`sdtorch finetune --method controlnet`, through its
     API, timed) into `<workdir>/out`;
  3. evaluates `--eval-pairs` new renders (another seed, `--eval-split`): the prompt names the colour only, the edge map
     shows the rest; the attribute judge (`evaluation.judge`) reads the shape, position, size and colour of
     the plain model's picture and of the ControlNet-guided one, same prompts and seeds (DPM++ 2M Karras,
     20 steps, the model's CFG 4), and of each render passed through the model's VAE (encode, decode): the
     most any picture drawn in its latents can reach;
  4. writes `<workdir>/report.json` and a grid (`--grid`, default docs/shapes-controlnet.png: edge maps, the
     plain model's pictures, the guided ones), and with `--ship DIR` copies the ControlNet there.

    .venv/bin/python scripts/shapes_controlnet.py --workdir runs/shapes-controlnet
    .venv/bin/python scripts/shapes_controlnet.py --workdir runs/shapes-controlnet --skip-train   # re-evaluate
    .venv/bin/python scripts/shapes_controlnet.py --workdir runs/shapes-controlnet --resume --steps 8000  # go on

Everything is seeded; `<workdir>/out` is written afresh unless --skip-train or --resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

import sdtorch
from sdtorch.data import shapes
from sdtorch.evaluation.judge import load_judge, score_predictions
from sdtorch.images import image_to_tensor, tensor_to_images
from sdtorch.preprocessors import preprocess
from sdtorch.request import ControlNetUnit
from sdtorch.training.datasets import DatasetConfig
from sdtorch.training.finetune import FineTuneConfig, finetune

ATTRIBUTES = ("shape", "position", "size", "colour")
MASK_MARGIN = 4  # px around the shape's square that its loss mask covers too (half a latent pixel)


def edge_map(image: PIL.Image.Image) -> PIL.Image.Image:
    """The A1111 extension's canny map of a 64 px render (its default thresholds 100 / 200)."""
    return preprocess("canny", image, resolution=image.width)


def prompt(attrs: shapes.Attributes) -> str:
    return f"a {attrs.colour} shape"


def pairs(count: int, seed: str, small_share: float | None = None) -> list[shapes.Attributes]:
    """`count` random renders' attributes; small_share: the share of small shapes (None: the world's, half)."""
    rng = random.Random(f"shapes-controlnet:{seed}")
    drawn = [shapes.sample_attributes(rng, "all") for _ in range(count)]
    if small_share is None:
        return drawn
    return [dataclasses.replace(a, size="small" if rng.random() < small_share else "large") for a in drawn]


def loss_mask(attrs: shapes.Attributes, weight: float, size: int = 64) -> PIL.Image.Image:
    """White on the shape's square (`shapes.shape_box`) and MASK_MARGIN px around it, grey 1/weight elsewhere."""
    cx, cy, side = shapes.shape_box(attrs)
    half = side * size / 2 + MASK_MARGIN
    mask = PIL.Image.new("L", (size, size), round(255 / weight))
    PIL.ImageDraw.Draw(mask).rectangle((cx * size - half, cy * size - half, cx * size + half, cy * size + half),
                                       fill=255)
    return mask


def write_data(workdir: Path, count: int, small_share: float | None = None,
               mask_weight: float | None = None) -> tuple[Path, Path, Path | None]:
    """`count` renders with colour-only captions in data/, their edge maps in conditions/ and with `mask_weight`
    their loss masks in masks-<mask_weight>/ (same file names)."""
    data, conditions = workdir / "data", workdir / "conditions"
    masks = None if mask_weight is None else workdir / f"masks-{mask_weight:g}"
    if data.is_dir() and len(list(data.glob("*.png"))) == count and (masks is None or masks.is_dir()):
        return data, conditions, masks
    for folder in (data, conditions, masks):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
    for i, attrs in enumerate(pairs(count, "train", small_share)):
        image = shapes.render(attrs)
        image.save(data / f"{i:05d}.png")
        (data / f"{i:05d}.txt").write_text(prompt(attrs))
        edge_map(image).save(conditions / f"{i:05d}.png")
        if masks is not None:
            loss_mask(attrs, mask_weight).save(masks / f"{i:05d}.png")
    return data, conditions, masks


def train(args: argparse.Namespace, data: Path, conditions: Path, masks: Path | None) -> tuple[Path, float]:
    out = args.workdir / "out"
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    config = FineTuneConfig(
        dataset=DatasetConfig(folder=str(data), resolution=64, conditioning_folder=str(conditions),
                              loss_mask_folder=str(masks or ""), cache_latents=True,
                              caption_dropout=args.caption_dropout, seed=args.seed),
        out=str(out), method="controlnet", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup, lr_scheduler="cosine", checkpoint_every=max(args.steps // 4, 1),
        log_every=20, seed=args.seed, controlnet_model=str(args.init_from) if args.init_from else "",
        ema_decay=args.ema_decay,
    )
    start = time.perf_counter()
    result = finetune(config)
    return result, time.perf_counter() - start


def evaluate(args: argparse.Namespace, controlnet: Path) -> tuple[dict, list]:
    pipe, judge = sdtorch.load(), load_judge()
    settings = dict(sampler_name="DPM++ 2M", scheduler="Karras", steps=20)
    runs = {"plain": [], "controlnet": [], "vae round trip": []}
    shown = []
    unit = dict(model=str(controlnet), weight=args.control_weight)
    for i, attrs in enumerate(pairs(args.eval_pairs, args.eval_split)):
        render = shapes.render(attrs)
        edges = edge_map(render)
        with torch.inference_mode():
            runs["vae round trip"] += tensor_to_images(pipe.vae(image_to_tensor(render)))
        plain = pipe(prompt(attrs), seed=i, **settings)[0]
        guided = pipe(prompt(attrs), seed=i, controlnet=[ControlNetUnit(image=edges, **unit)],
                      **settings)[0]
        runs["plain"].append(plain)
        runs["controlnet"].append(guided)
        if i < args.grid_columns:
            shown.append((edges, plain, guided))
        print(f"\r{i + 1}/{args.eval_pairs}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    intended = [{name: getattr(a, name) for name in ATTRIBUTES} for a in pairs(args.eval_pairs, args.eval_split)]
    report = {}
    for name, images in runs.items():
        scored = score_predictions(judge.predict(images), intended)
        report[name] = {"accuracy": scored["accuracy"], "all_correct": scored["all_correct"]}
    return report, shown


def draw_grid(rows: list, path: Path) -> None:
    """Columns: pairs; rows: edge map, plain model, ControlNet (64 px cells, 2 px gaps)."""
    cell, gap = 64, 2
    grid = PIL.Image.new("RGB", (len(rows) * (cell + gap) - gap, 3 * (cell + gap) - gap), (255, 255, 255))
    for x, column in enumerate(rows):
        for y, image in enumerate(column):
            grid.paste(image.convert("RGB").resize((cell, cell)), (x * (cell + gap), y * (cell + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/shapes-controlnet"))
    parser.add_argument("--pairs", type=int, default=4000, help="training renders")
    parser.add_argument("--small-share", type=float, default=None,
                        help="the share of small shapes among the training renders (default: the world's, half)")
    parser.add_argument("--mask-weight", type=float, default=None,
                        help="weigh the loss on the shape's square this many times the background's (loss masks)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=None, help="train with an EMA of the weights and ship it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-pairs", type=int, default=200)
    parser.add_argument("--eval-split", default="eval", help="the seed of the evaluated renders: eval (the reported "
                        "figures), or another name for a split of its own (e.g. val, to choose settings on)")
    parser.add_argument("--control-weight", type=float, default=1.0,
                        help="the ControlNet unit's weight when evaluating")
    parser.add_argument("--grid-columns", type=int, default=12)
    parser.add_argument("--grid", type=Path, default=Path("docs/shapes-controlnet.png"))
    parser.add_argument("--ship", type=Path, default=None, help="copy the trained ControlNet folder here")
    parser.add_argument("--skip-train", action="store_true", help="evaluate <workdir>/out/controlnet as it is")
    parser.add_argument("--init-from", type=Path, default=None, help="start from this ControlNet (a run's "
                        "<workdir>/out/controlnet) instead of the base UNet's encoder")
    parser.add_argument("--resume", action="store_true", help="continue <workdir>/out's run up to --steps in all "
                        "(the cosine schedule then spans the new total); the training time adds up")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report_file = args.workdir / "report.json"
    previous = json.loads(report_file.read_text()) if report_file.is_file() else {}
    data, conditions, masks = write_data(args.workdir, args.pairs, args.small_share, args.mask_weight)
    if args.skip_train:
        controlnet, seconds = args.workdir / "out" / "controlnet", previous.get("training_seconds")
    else:
        controlnet, seconds = train(args, data, conditions, masks)
        if args.resume and previous.get("training_seconds"):
            seconds += previous["training_seconds"]
    scores, shown = evaluate(args, controlnet)
    report = {
        "training_seconds": seconds, "scores": scores,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    report_file.write_text(json.dumps(report, indent=2))
    draw_grid(shown, args.grid)
    if args.ship is not None:
        shutil.rmtree(args.ship, ignore_errors=True)
        shutil.copytree(controlnet, args.ship)
    for name, result in scores.items():
        accuracy = ", ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items())
        print(f"{name:>14}: {accuracy}; all correct {result['all_correct']:.1%}")
    if seconds is not None:
        print(f"training: {seconds:.1f} s")


if __name__ == "__main__":
    main()
