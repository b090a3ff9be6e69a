"""Sample grids while training: the fine-tune's `sample_prompts` drawn with the weights of the moment.

`<out>/samples/step-00000100.png` holds one picture per prompt (seeds seed, seed + 1, ..., the model's
default sampler, steps and CFG, the dataset's resolution), each under its prompt. Drawing them changes
nothing a training step sees: modules come back in the mode they were in, and the global RNG state
(which dropout draws from) is restored, so a run that samples resumes exactly as one that does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoints.io import atomic_write
from ..grids import image_grid

if TYPE_CHECKING:
    from ..pipeline import Pipeline

SAMPLES_DIR = "samples"


def write_sample_grid(pipe: Pipeline, prompts: Sequence[str], path: Path, *, resolution: int, seed: int,
                      modules: Sequence[nn.Module] = ()) -> Path:
    """Draw `prompts` with `pipe` in eval mode (and `modules`, e.g. a LoRA network) into the grid at `path`."""
    everything = [pipe.unet, pipe.text_encoder, pipe.vae, *modules]
    modes = [(m, m.training) for module in everything for m in module.modules()]
    try:
        with torch.random.fork_rng(devices=[]):
            for module in everything:
                module.eval()
            images = [pipe(prompt, width=resolution, height=resolution, seed=seed + i)[0]
                      for i, prompt in enumerate(prompts)]
    finally:
        for m, training in modes:
            m.training = training
    grid = image_grid(images, list(prompts))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


def sampler(pipe: Pipeline, prompts: Sequence[str], out: Path, *, every: int, last: int, resolution: int, seed: int,
            modules: Sequence[nn.Module] = ()) -> Callable[[int], None]:
    """A per-step hook: at steps that are multiples of `every` (0: none) and at step `last`, write the grid
    of `prompts` to out/samples/step-NNNNNNNN.png; nothing when there are no prompts."""

    def maybe_sample(step: int) -> None:
        if prompts and (step == last or (every and step % every == 0)):
            write_sample_grid(pipe, prompts, out / SAMPLES_DIR / f"step-{step:08d}.png", resolution=resolution,
                              seed=seed, modules=modules)

    return maybe_sample
