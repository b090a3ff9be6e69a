"""`sdtorch eval`: how often a shapes-world model draws what its prompt asks for, scored by the judge.

Prompts are fresh captions of random attribute sets (seeded, so a run is repeatable): most from the
training split's (shape, colour) pairs, some from the held-out pairs no training image showed. Each
prompt is generated once (image i with seed + i) and the judge checks the attributes the prompt names.
With `compare_guidance` the same prompts and seeds run again without guidance (scale 1).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.shapes import caption, parse_prompt, sample_attributes
from ..errors import InvalidInputError
from ..pipeline import Pipeline
from .judge import ATTRIBUTES, AttributeJudge, load_judge, score_predictions


@dataclass(frozen=True)
class EvalPrompt:
    text: str
    intended: dict[str, str]  # what the prompt names (shapes.parse_prompt), the judge's targets
    held_out: bool  # a (shape, colour) pair never seen in training


def eval_prompts(count: int, held_out: int, seed: int = 0) -> list[EvalPrompt]:
    """`count` prompts of the training pairs followed by `held_out` prompts of the held-out pairs."""
    if count < 0 or held_out < 0 or count + held_out == 0:
        raise InvalidInputError(f"need at least one prompt, got count={count}, held_out={held_out}")
    rng = random.Random(f"sdtorch.eval:{seed}")
    prompts = []
    for split, n in (("train", count), ("held_out", held_out)):
        for _ in range(n):
            text = caption(sample_attributes(rng, split), rng)
            prompts.append(EvalPrompt(text, parse_prompt(text), split == "held_out"))
    return prompts


def generate_and_score(
    pipe: Pipeline,
    prompts: Sequence[EvalPrompt],
    judge: AttributeJudge,
    *,
    seed: int = 0,
    guidance_scale: float = 7.5,
    steps: int = 20,
    sampler: str = "DPM++ 2M",
    schedule: str = "Karras",
    deep_cache: int = 1,
    batch_size: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate one image per prompt and score them: {"all": score, "held_in": score, "held_out": score}
    (each as `judge.score` returns, None for an empty group)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        images += pipe([p.text for p in batch], steps=steps, cfg_scale=guidance_scale, sampler_name=sampler,
                       scheduler=schedule, deep_cache=deep_cache, seed=seed + start)
        if progress is not None:
            progress(len(images), len(prompts))
    predictions = judge.predict(images)

    def group(keep: Callable[[EvalPrompt], bool]) -> dict | None:
        chosen = [i for i, p in enumerate(prompts) if keep(p)]
        if not chosen:
            return None
        return score_predictions([predictions[i] for i in chosen], [prompts[i].intended for i in chosen])

    return {
        "all": group(lambda p: True),
        "held_in": group(lambda p: not p.held_out),
        "held_out": group(lambda p: p.held_out),
        "images": images,
    }


def evaluate(
    pipe: Pipeline,
    count: int = 500,
    held_out: int = 100,
    *,
    seed: int = 0,
    guidance_scale: float = 7.5,
    compare_guidance: bool = True,
    judge: AttributeJudge | None = None,
    steps: int = 20,
    sampler: str = "DPM++ 2M",
    schedule: str = "Karras",
    deep_cache: int = 1,
    batch_size: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score `count` held-in and `held_out` held-out prompts at `guidance_scale` (and at 1 when comparing).

    Returns {"settings": ..., "guided": results, "unguided": results or None}; results as `generate_and_score`
    returns them, without the images.
    """
    judge = judge or load_judge()
    prompts = eval_prompts(count, held_out, seed)
    report: dict[str, Any] = {
        "settings": {"prompts": count, "held_out_prompts": held_out, "seed": seed, "guidance_scale": guidance_scale,
                     "steps": steps, "sampler": sampler, "schedule": schedule, "deep_cache": deep_cache},
        "guided": None,
        "unguided": None,
    }
    runs = {"guided": guidance_scale, "unguided": 1.0} if compare_guidance else {"guided": guidance_scale}
    for key, scale in runs.items():
        results = generate_and_score(pipe, prompts, judge, seed=seed, guidance_scale=scale, steps=steps,
                                     sampler=sampler, schedule=schedule, deep_cache=deep_cache, batch_size=batch_size,
                                     progress=progress)
        results.pop("images")
        report[key] = results
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of an `evaluate` report."""
    s = report["settings"]
    lines = [f"{s['prompts']} held-in + {s['held_out_prompts']} held-out prompts, seed {s['seed']}"]
    runs = [("guided", f"CFG {s['guidance_scale']:g}"), ("unguided", "CFG 1 (off)")]
    header = f"{'':<22}" + "".join(f"{label:>14}" for key, label in runs if report.get(key))
    lines.append(header)

    def row(name: str, pick: Callable[[dict], float | None]) -> str:
        cells = []
        for key, _ in runs:
            if report.get(key):
                value = pick(report[key])
                cells.append(f"{'-' if value is None else f'{100 * value:.1f}%':>14}")
        return f"{name:<22}" + "".join(cells)

    for attribute in ATTRIBUTES:
        lines.append(row(attribute, lambda r, a=attribute: r["all"]["accuracy"][a]))
    lines.append(row("all correct", lambda r: r["all"]["all_correct"]))
    lines.append(row("held-in all correct", lambda r: r["held_in"]["all_correct"] if r["held_in"] else None))
    lines.append(row("held-out all correct", lambda r: r["held_out"]["all_correct"] if r["held_out"] else None))
    return "\n".join(lines)
