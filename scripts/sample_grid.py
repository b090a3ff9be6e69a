"""Draw the README's grid: the default model's pictures for a set of prompts, each under its prompt.

    .venv/bin/python scripts/sample_grid.py [--out docs/shapes-samples.png] [--model SRC] [--cfg 4]

Prompts in the last row use (shape, colour) pairs held out of training. Seeds are 0, 1, 2, ...
"""

from __future__ import annotations

import argparse

import sdtorch
from sdtorch.checkpoints.io import atomic_write
from sdtorch.grids import image_grid

PROMPTS = [
    "a small red star in the top left",
    "a large blue circle in the center",
    "a yellow triangle at the bottom right, on black",
    "big green square, left, white background",
    "a tiny purple diamond in the upper right corner",
    "an orange cross at the bottom",
    "a large white star on a light blue background",
    "small black circle, top, on gray",
    # held-out (shape, colour) pairs: never seen together in training
    "a large purple circle in the center",
    "a small orange square on the right",
    "a blue triangle in the top left",
    "a big green star in the lower left",
]
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/shapes-samples.png")
    parser.add_argument("--model", help="default: the shipped shapes model")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the model's; 4 for the shapes model)")
    args = parser.parse_args()
    pipe = sdtorch.load(args.model)
    images = [pipe(p, num_inference_steps=20, sampler="DPM++ 2M", schedule="Karras", cfg_scale=args.cfg, seed=i)[0]
              for i, p in enumerate(PROMPTS)]
    grid = image_grid(images, PROMPTS, columns=4, scale=3)
    atomic_write(args.out, lambda tmp: grid.save(tmp, format="PNG"))
    print(args.out)


if __name__ == "__main__":
    main()
