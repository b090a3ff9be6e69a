"""The attribute judge: a small CNN that reads shape, colour, size and position off a shapes-world image.

It scores generated images against their prompts (`score`), so the default model's quality is measured, not
eyeballed. It is trained on fresh renders of `sdtorch.data.shapes` with their true labels, every
(shape, colour) pair included (held-out pairs too: the judge must recognise them), plus hexagons drawn in the
same style (fine-tuning will teach the generator hexagons; the judge knows them from the start). Light
augmentation (a small shift/scale/rotation, blur, colour jitter, noise) makes it robust to the imperfections of
generated images.

    judge = load_judge()                                  # the shipped weights (assets/judge.safetensors)
    judge.predict(images)                                 # [{"shape": "star", "colour": "red", ...}, ...]
    score(judge, images, [parse_prompt(p) for p in prompts])

Re-train and write the weights: `python -m sdtorch.evaluation.judge --train --steps 1500 --out judge.safetensors`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints.io import read_safetensors, write_safetensors
from ..data import shapes
from ..errors import CheckpointError, InvalidInputError
from ..images import image_to_tensor

HEXAGON = "hexagon"  # reserved for fine-tuning: the shapes world never draws it, the judge's own renderer does
LABELS: dict[str, tuple[str, ...]] = {
    "shape": (*shapes.SHAPES, HEXAGON),
    "colour": tuple(shapes.COLOURS),
    "size": tuple(shapes.SIZES),
    "position": tuple(shapes.POSITIONS),
}
ATTRIBUTES = tuple(LABELS)  # the attributes the judge reads; a prompt's background is not judged
IMAGE_SIZE = 64


def _block(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1), nn.GroupNorm(8, out_ch), nn.SiLU())


class AttributeJudge(nn.Module):
    """CNN on (B, 3, 64, 64) images in [-1, 1] with one classification head per attribute (`LABELS`).

    Two coordinate channels are appended to the input (computed in forward, no buffers), so the position head
    reads where the object is directly. The heads see the features averaged and max-pooled over the image (what is
    there, wherever it is) and a coarse 4x4 map of a few channels (where it is). About 150k parameters.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(5, 32, 4, 2, 1), nn.GroupNorm(8, 32), nn.SiLU(),  # 64 -> 32
            _block(32, 32, 1),
            _block(32, 48, 2),  # 32 -> 16
            _block(48, 48, 1),
            _block(48, 64, 2),  # 16 -> 8
            _block(64, 64, 1),
        )  # fmt: skip
        self.squeeze = nn.Conv2d(64, 8, 1)  # a few channels kept on a coarse grid: where things are
        self.trunk = nn.Sequential(nn.Linear(64 + 64 + 8 * 4 * 4, 128), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in LABELS.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, 64, 64) in [-1, 1] -> {attribute: logits (B, n_classes)}."""
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = self.features(torch.cat([images, ys, xs], dim=1))  # (B, 5, 64, 64) -> (B, 64, 8, 8)
        grid = F.avg_pool2d(self.squeeze(x), 2).flatten(1)  # (B, 8, 4, 4) -> (B, 128)
        x = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3)), grid], dim=1)  # (B, 256): what, anywhere + where
        x = self.trunk(x)  # (B, 128)
        return {name: head(x) for name, head in self.heads.items()}

    @torch.inference_mode()
    def predict(self, images: Tensor | Sequence[PIL.Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
        """The judged attributes of each image: [{"shape": ..., "colour": ..., "size": ..., "position": ...}].

        `images` is a (B, 3, H, W) tensor in [-1, 1] or a list of PIL images; other sizes are resized to 64x64.
        """
        pixels = as_judge_input(images)
        param = next(self.parameters())
        predictions: list[dict[str, str]] = []
        for start in range(0, pixels.shape[0], batch_size):
            logits = self(pixels[start : start + batch_size].to(param.device, param.dtype))
            indices = {name: logit.argmax(dim=1).tolist() for name, logit in logits.items()}  # {name: (b,)}
            for i in range(len(indices["shape"])):
                predictions.append({name: LABELS[name][indices[name][i]] for name in ATTRIBUTES})
        return predictions


def as_judge_input(images: Tensor | Sequence[PIL.Image.Image]) -> Tensor:
    """A (B, 3, H, W) tensor in [-1, 1] or PIL images -> (B, 3, 64, 64) float32 in [-1, 1]."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidInputError(f"images must be (B, 3, H, W) in [-1, 1]; got shape {tuple(images.shape)}")
        pixels = images.detach().float()
    else:
        if not all(isinstance(image, PIL.Image.Image) for image in images):
            raise InvalidInputError("images must be a (B, 3, H, W) tensor or a list of PIL images")
        pixels = torch.cat([image_to_tensor(image) for image in images]) if images else torch.zeros(0, 3, 64, 64)
    if pixels.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        pixels = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return pixels


# ----------------------------------------------------------------------------- scoring


def score(judge: AttributeJudge, images: Tensor | Sequence[PIL.Image.Image], intended: Sequence[dict]) -> dict:
    """Judge images against what their prompts asked for (`intended[i]`, e.g. `shapes.parse_prompt(prompt)`).

    Only the attributes a prompt names are judged (a background is not judged at all). Returns
    {"n": images, "accuracy": {attribute: fraction correct among images whose prompt names it},
     "counts": {attribute: how many prompts name it}, "all_correct": fraction of images whose judged attributes
    are all right (an image whose prompt names none counts as right)}. An attribute no prompt names has
    accuracy None.
    """
    predictions = judge.predict(images)
    return score_predictions(predictions, intended)


def score_predictions(predictions: Sequence[dict[str, str]], intended: Sequence[dict]) -> dict:
    """The arithmetic of `score`, on predictions already made."""
    if len(predictions) != len(intended):
        raise InvalidInputError(f"{len(predictions)} images but {len(intended)} intended attribute sets")
    correct = dict.fromkeys(ATTRIBUTES, 0)
    counts = dict.fromkeys(ATTRIBUTES, 0)
    all_correct = 0
    for predicted, wanted in zip(predictions, intended):
        right = True
        for name in ATTRIBUTES:
            if name not in wanted:
                continue
            if wanted[name] not in LABELS[name]:
                raise InvalidInputError(f"the judge has no {name} {wanted[name]!r}; it knows {LABELS[name]}")
            counts[name] += 1
            hit = predicted[name] == wanted[name]
            correct[name] += hit
            right &= hit
        all_correct += right
    n = len(predictions)
    return {
        "n": n,
        "accuracy": {name: correct[name] / counts[name] if counts[name] else None for name in ATTRIBUTES},
        "counts": counts,
        "all_correct": all_correct / n if n else None,
    }


# ----------------------------------------------------------------------------- training data


def draw_labelled(rng: random.Random, cache: dict | None = None) -> tuple[PIL.Image.Image, dict[str, str]]:
    """One training picture and its true labels: any (shape, colour) pair of the shapes world (held-out pairs
    included), or a hexagon one time in len(SHAPES) + 1.

    Rendering is a pure function of the attributes and the world holds only a few thousand distinct pictures,
    so a `cache` dict (filled here) saves re-drawing them; the stream of pictures is the same with or without.
    """
    attrs = shapes.sample_attributes(rng, split="all")
    labels = {name: getattr(attrs, name) for name in ATTRIBUTES}
    hexagon = rng.randrange(len(LABELS["shape"])) == 0
    if hexagon:
        labels["shape"] = HEXAGON
    key = (attrs, hexagon)
    image = cache.get(key) if cache is not None else None
    if image is None:
        image = shapes.render(attrs, shape="hexagon" if hexagon else None)
        if cache is not None:
            cache[key] = image
    return image, labels


def draw_batch(rng: random.Random, count: int, cache: dict | None = None) -> tuple[Tensor, list[dict[str, str]]]:
    """`count` fresh labelled pictures -> (images (B, 3, 64, 64) in [-1, 1], labels)."""
    drawn = [draw_labelled(rng, cache) for _ in range(count)]
    return torch.cat([image_to_tensor(image) for image, _ in drawn]), [labels for _, labels in drawn]


def _targets(labels: Sequence[dict[str, str]]) -> dict[str, Tensor]:
    """Labels -> {attribute: class indices (B,)}."""
    return {name: torch.tensor([LABELS[name].index(l[name]) for l in labels]) for name in ATTRIBUTES}


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Imperfections generated images show: a small shift/scale/rotation, blur, colour jitter, noise.

    Ranges stay well inside the class boundaries: shifts <= 3 px (grid cells are ~21 px), scale +-10% (small and
    large differ 2x), rotation +-8 degrees (a diamond is a square turned 45), colour shifts <= ~14/255 per channel.
    """
    b = images.shape[0]

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    # affine: output pixel p samples input at A p + t (normalised coordinates), border colour fills the edges
    angle = uniform(-8, 8) * math.pi / 180  # (B,)
    scale = uniform(0.9, 1.1)
    shift = uniform(-3, 3, 2) * 2 / IMAGE_SIZE  # (B, 2) pixels -> normalised
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([theta, shift.unsqueeze(2)], dim=2)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, 64, 64, 2)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # gaussian blur, sigma in [0, 0.9] px per image: separable 5-tap kernels, one per image
    sigma = uniform(0.0, 0.9).clamp_min(1e-3)  # (B,)
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma[:, None] ** 2))  # (B, 5)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, dim=0)  # (B*3, 5)
    x = x.reshape(1, b * 3, IMAGE_SIZE, IMAGE_SIZE)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * 3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=b * 3)
    x = x.reshape(b, 3, IMAGE_SIZE, IMAGE_SIZE)

    # colour jitter: contrast, brightness, per-channel offset; then pixel noise
    x = x * uniform(0.9, 1.1, 1, 1, 1) + uniform(-0.06, 0.06, 1, 1, 1) + uniform(-0.05, 0.05, 3, 1, 1)
    x = x + uniform(0.0, 0.05, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------- training, saving, loading


def train_judge(steps: int = 1500, seed: int = 0, batch_size: int = 64, log_every: int = 0) -> AttributeJudge:
    """Train a judge from scratch on fresh augmented renders (CPU: about 5 minutes for 1500 steps on 2 busy cores).

    Deterministic in `seed`. AdamW with a short warm-up and a cosine decay; the loss is the sum of the heads'
    cross-entropies. `log_every` > 0 prints the running loss.
    """
    torch.manual_seed(seed)
    judge = AttributeJudge()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    judge.train()
    cache: dict = {}
    running = 0.0
    for step in range(steps):
        images, labels = draw_batch(rng, batch_size, cache)
        logits = judge(augment(images, generator))
        targets = _targets(labels)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {running:.4f}", flush=True)
    return judge.eval()


def save_judge(judge: AttributeJudge, path: str | Path) -> None:
    """Atomically write the judge's weights as safetensors, with its label lists in the metadata."""
    write_safetensors(judge.state_dict(), path, metadata={"labels": json.dumps(LABELS)})


def read_judge(path: str | Path) -> AttributeJudge:
    """A judge from weights `save_judge` wrote (in eval mode); its labels must be the ones this code knows."""
    tensors, metadata = read_safetensors(path, dtype=torch.float32)
    stored = json.loads(metadata.get("labels", "null"))
    if stored != {name: list(labels) for name, labels in LABELS.items()}:
        raise CheckpointError(f"{path}: judge labels {stored} differ from this sdtorch's {LABELS}; re-train it")
    with torch.device("meta"):
        judge = AttributeJudge()
    judge.load_state_dict(tensors, strict=True, assign=True)
    return judge.eval()


@functools.lru_cache(maxsize=1)
def load_judge() -> AttributeJudge:
    """The shipped judge (`sdtorch/assets/judge.safetensors`), read once and shared: do not train it in place."""
    with importlib.resources.as_file(importlib.resources.files("sdtorch") / "assets" / "judge.safetensors") as path:
        return read_judge(path)


def render_accuracy(judge: AttributeJudge, count: int, seed: int, augmented: bool = False) -> dict[str, dict]:
    """Per-attribute accuracy on `count` fresh renders from `seed` ({"all", "held_out", "hexagon"} subsets).

    "held_out" holds the images of the shapes world's held-out (shape, colour) pairs; "hexagon" the hexagons.
    """
    images, truths = draw_batch(random.Random(seed), count)
    if augmented:
        images = augment(images, torch.Generator().manual_seed(seed))
    predictions = judge.predict(images)
    subsets = {
        "all": range(count),
        "held_out": [i for i, t in enumerate(truths) if (t["shape"], t["colour"]) in shapes.HELD_OUT_PAIRS],
        "hexagon": [i for i, t in enumerate(truths) if t["shape"] == HEXAGON],
    }
    return {
        name: score_predictions([predictions[i] for i in index], [truths[i] for i in index])
        for name, index in subsets.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdtorch.evaluation.judge", description=__doc__.split("\n")[0])
    parser.add_argument("--train", action="store_true", help="train a judge and write its weights to --out")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--out",
        type=Path,
        help="with --train: where to write the weights; else: the weights to evaluate (default: shipped)",
    )
    parser.add_argument("--eval-count", type=int, default=2000, help="fresh renders to measure accuracy on")
    args = parser.parse_args(argv)

    if args.train:
        start = time.perf_counter()
        judge = train_judge(args.steps, args.seed, args.batch_size, log_every=max(1, args.steps // 20))
        print(f"trained {args.steps} steps (batch {args.batch_size}) in {time.perf_counter() - start:.0f} s")
        if args.out:
            save_judge(judge, args.out)
            print(f"wrote {args.out}")
    else:
        judge = read_judge(args.out) if args.out else load_judge()
    eval_seed = args.seed + 1_000_003  # a stream apart from training's (clean renders do repeat: the world is finite)
    for augmented in (False, True):
        results = render_accuracy(judge, args.eval_count, eval_seed, augmented)
        for subset, result in results.items():
            accuracy = "  ".join(f"{name} {value:.4f}" for name, value in result["accuracy"].items())
            label = f"{subset}{' (augmented)' if augmented else ''}"
            print(f"{label:<22} n={result['n']:<5} {accuracy}  all-correct {result['all_correct']:.4f}")


if __name__ == "__main__":
    main()
