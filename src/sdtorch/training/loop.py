"""A generic, resumable training loop: state, checkpoints that resume exactly, EMA, and the driver.

Exact resumption rests on two rules:
- every random draw of a step comes from `step_generator(seed, step)` or the batch order of
  `batch_indices(seed, step, ...)`: a function of (seed, step), not of how many steps this process ran;
- a checkpoint holds everything else that changes while training: weights, optimizer and LR-scheduler
  state, EMA weights, the global Python/torch RNG states (dropout draws from them) and the step.

So a run interrupted after checkpoint k and resumed reaches step n with bit-identical weights.

Checkpoint folder layout (each file written atomically; `checkpoint.json` is the commit point):
    step-00000100.safetensors   every tensor of the state, flat ("model.unet.conv_in.weight", ...)
    checkpoint.json             step, config, and the non-tensor state (optimizer hyper-parameters,
                                scheduler counters, RNG state), with tensors referenced by name
    timings.json                wall time per stage (`record_timing`)
    log.jsonl                   one line of logged metrics per `log_every` steps
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints.io import read_safetensors, write_json, write_safetensors
from ..errors import CheckpointError, InvalidInputError, NonFiniteError

logger = logging.getLogger(__name__)

CHECKPOINT_JSON = "checkpoint.json"
TIMINGS_JSON = "timings.json"
LOG_JSONL = "log.jsonl"
FORMAT_VERSION = 1

StepFn = Callable[["TrainState"], "torch.Tensor | dict[str, torch.Tensor]"]


# ---- determinism ---------------------------------------------------------------------------------


def _mix(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed from (seed, step, stream) that differs for every triple in practice (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by (seed, step, stream): a step's noise no matter when the step runs.

    Draw on the CPU and move the result to the device: the same numbers on every device.
    """
    return torch.Generator("cpu").manual_seed(_mix(seed, step, stream))


def batch_indices(seed: int, step: int, batch_size: int, length: int) -> list[int]:
    """Dataset indices of a step's batch: epoch e visits every index once, in a permutation seeded by (seed, e)."""
    if length <= 0 or batch_size <= 0:
        raise InvalidInputError(f"need a non-empty dataset and batch, got length {length}, batch_size {batch_size}")
    first = step * batch_size
    epochs = range(first // length, (first + batch_size - 1) // length + 1)
    order = torch.cat([torch.randperm(length, generator=step_generator(seed, e, stream=-1)) for e in epochs])
    start = first - epochs[0] * length
    return order[start : start + batch_size].tolist()


# ---- EMA ---------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's trainable (requires_grad) floating-point parameters.

    After each optimizer step, `update(model)` does shadow = d * shadow + (1 - d) * param with
    d = decay, or with `warmup`, d = min(decay, (1 + n) / (10 + n)) after n earlier updates (so early
    averages are not dominated by the random initialisation). Shadows are float32 copies on the
    parameters' devices.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise InvalidInputError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {
            name: p.detach().to(torch.float32, copy=True)
            for name, p in model.named_parameters()
            if p.requires_grad and p.is_floating_point()
        }

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.mul_(d).add_(params[name].detach().float(), alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (cast to each parameter's dtype)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow)

    @contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the model with the averaged weights inside the block; its own weights come back after."""
        saved = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise CheckpointError("EMA state does not match the model's parameters")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for name, shadow in self.shadow.items():
            shadow.copy_(state["shadow"][name])


# ---- state -------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything a training run changes, and what `save_checkpoint` / `resume` write and restore.

    `models` are the trained modules (frozen helpers such as a text encoder stay outside); `ema`
    maps some of their names to averages; `config` (JSON-able) is saved and checked on resume;
    `seed` is what step functions derive their randomness from.
    """

    models: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    ema: dict[str, EMA] = field(default_factory=dict)
    step: int = 0
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the steps taken so far, across resumptions


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Nested state (optimizer, scheduler, RNG) -> JSON + named tensors. A plain JSON object stands for a
# dict with string keys; these one-key objects stand for what JSON lacks.
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise CheckpointError(f"two state entries flatten to the same name {path!r}")
        tensors[path] = obj
        return {_TENSOR: path}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not {_TENSOR, _TUPLE, _DICT} & set(obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {_DICT: [[_encode(k, f"{path}.key", {}), _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot checkpoint {path!r}: a {type(obj).__name__} is neither a tensor nor plain data")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _DICT in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_DICT]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(config))


def save_checkpoint(state: TrainState, folder: str | Path) -> Path:
    """Write the state to `folder` atomically; older tensor files are removed once the new one is committed."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    payload = {
        "models": {name: m.state_dict() for name, m in state.models.items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "ema": {name: e.state_dict() for name, e in state.ema.items()},
        "rng": _rng_state(),
    }
    encoded = {key: _encode(value, key, tensors) for key, value in payload.items()}
    name = f"step-{state.step:08d}.safetensors"
    write_safetensors(tensors, folder / name)
    record = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "seed": state.seed,
        "seconds": state.seconds,
        "config": _normalise(state.config),
        "tensors": name,
        "state": encoded,
    }
    write_json(record, folder / CHECKPOINT_JSON)  # the commit point
    for old in folder.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def resume(state: TrainState, folder: str | Path) -> bool:
    """Restore `state` in place from the checkpoint in `folder`; False (state untouched) when there is none.

    The models, optimizer, scheduler and EMA must be built as they were when the checkpoint was saved;
    tensors are copied onto the devices and dtypes of the objects in `state`.
    """
    folder = Path(folder)
    if not (folder / CHECKPOINT_JSON).is_file():
        return False
    try:
        record = json.loads((folder / CHECKPOINT_JSON).read_text(encoding="utf-8"))
        tensors, _ = read_safetensors(folder / record["tensors"])
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{folder}: unreadable training checkpoint ({type(e).__name__}: {e})") from None
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {record.get('format_version')}, expected {FORMAT_VERSION}")
    config = _normalise(state.config)
    if record["config"] != config:
        changed = sorted(k for k in {*record["config"], *config} if record["config"].get(k) != config.get(k))
        raise InvalidInputError(
            f"{folder} was written with a different training config (differs in: {', '.join(changed)}); "
            "resume with the same config or use a new folder"
        )
    saved = _decode(record["state"], tensors)
    if set(saved["models"]) != set(state.models) or set(saved["ema"]) != set(state.ema):
        raise CheckpointError(
            f"{folder}: checkpoint holds models {sorted(saved['models'])} and EMA {sorted(saved['ema'])}; "
            f"the state has {sorted(state.models)} and {sorted(state.ema)}"
        )
    if (saved["scheduler"] is None) != (state.scheduler is None):
        raise CheckpointError(f"{folder}: the checkpoint and the state disagree on having an LR scheduler")
    for name, model in state.models.items():
        model.load_state_dict(saved["models"][name], strict=True)
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scheduler is not None:
        state.scheduler.load_state_dict(saved["scheduler"])
    for name, ema in state.ema.items():
        ema.load_state_dict(saved["ema"][name])
    _set_rng_state(saved["rng"])
    state.step, state.seed, state.seconds = record["step"], record["seed"], record["seconds"]
    return True


def record_timing(path: str | Path, stage: str, **values: Any) -> None:
    """Merge `values` into the entry of `stage` in the JSON file at `path` (created if missing)."""
    path = Path(path)
    timings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    timings[stage] = {**timings.get(stage, {}), **values}
    write_json(timings, path)


# ---- LR schedule -------------------------------------------------------------------------------------


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then a cosine decay to `final_ratio` of the LR at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- the driver --------------------------------------------------------------------------------------


def train(
    step_fn: StepFn,
    state: TrainState,
    steps: int,
    *,
    batch_size: int,
    folder: str | Path | None = None,
    checkpoint_every: int = 500,
    log_every: int = 50,
    stage: str = "train",
    max_grad_norm: float | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    write: bool = True,
    on_step: Callable[[TrainState, dict[str, torch.Tensor]], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train until `state.step == steps`, resuming from `folder` when it holds a checkpoint.

    `step_fn(state)` builds the batch of step `state.step` and returns the loss (a scalar tensor) or a
    dict with a "loss" entry and other scalars to log; this driver runs backward, gradient clipping,
    the optimizer, the LR scheduler and the EMA updates, then advances `state.step`. Every
    `log_every` steps it logs the mean of each metric, the LR and images/s (to `log`, the module
    logger, and `folder/log.jsonl`); every `checkpoint_every` steps and at the end it saves a
    checkpoint and updates this stage's entry in `folder/timings.json` (wall seconds, steps, images/s).
    A loss that turns NaN or inf stops the run before its weights are checkpointed.

    Gradients are zeroed before `step_fn` runs, so a step function may itself run backward on earlier
    micro-batches (gradient accumulation) before returning the last one's loss. `backward(loss)` runs
    the backward pass (accelerate's `Accelerator.backward` for loss scaling). With `write` False (a
    process other than rank 0) the run resumes from `folder` but writes nothing there. `on_step(state,
    metrics)` runs after every step, `on_checkpoint(state)` after every checkpoint written.
    """
    if min(batch_size, checkpoint_every, log_every) < 1:
        raise InvalidInputError("batch_size, checkpoint_every and log_every must be positive integers")
    if folder is not None:
        if write:
            Path(folder).mkdir(parents=True, exist_ok=True)
        resume(state, folder)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    for model in state.models.values():
        model.train()

    window: dict[str, torch.Tensor] = {}
    window_steps, window_start = 0, time.perf_counter()
    run_start, run_seconds_base = time.perf_counter(), state.seconds

    def window_means() -> dict[str, float]:
        metrics = {k: v.item() / window_steps for k, v in window.items()}
        if not all(math.isfinite(v) for v in metrics.values()):
            raise NonFiniteError(f"{stage}: loss became {metrics} by step {state.step}; lower the LR or check the data")
        return metrics

    def finish_window() -> None:
        nonlocal window, window_steps, window_start
        if not window_steps:
            return
        now = time.perf_counter()
        metrics = window_means()
        entry = {
            "stage": stage, "step": state.step, **metrics,
            "lr": state.optimizer.param_groups[0]["lr"],
            "images_per_s": batch_size * window_steps / max(now - window_start, 1e-9),
        }
        (log or _log)(entry)
        if folder is not None and write:
            with open(Path(folder) / LOG_JSONL, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        window, window_steps, window_start = {}, 0, now

    def checkpoint() -> None:
        if window_steps:
            window_means()  # never checkpoint weights a non-finite loss has touched
        state.seconds = run_seconds_base + time.perf_counter() - run_start
        if folder is None or not write:
            return
        save_checkpoint(state, folder)
        record_timing(
            Path(folder) / TIMINGS_JSON, stage, seconds=round(state.seconds, 3), steps=state.step,
            images_per_s=round(batch_size * state.step / max(state.seconds, 1e-9), 2), done=state.step >= steps,
        )
        if on_checkpoint is not None:
            on_checkpoint(state)

    if state.step >= steps:
        return state
    while state.step < steps:
        state.optimizer.zero_grad(set_to_none=True)
        out = step_fn(state)
        metrics = out if isinstance(out, dict) else {"loss": out}
        backward(metrics["loss"])
        if max_grad_norm is not None:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        state.optimizer.step()
        if state.scheduler is not None:
            state.scheduler.step()
        for name, ema in state.ema.items():
            ema.update(state.models[name])
        state.step += 1
        for k, v in metrics.items():  # summed on the device; synced only at log time
            window[k] = window.get(k, 0) + torch.as_tensor(v).detach().float()
        window_steps += 1
        if on_step is not None:
            on_step(state, metrics)
        if state.step % log_every == 0:
            finish_window()
        if state.step % checkpoint_every == 0 and state.step < steps:
            checkpoint()
    finish_window()
    checkpoint()
    return state


def _log(entry: dict[str, Any]) -> None:
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "stage"]
    logger.info("%s: %s", entry["stage"], ", ".join(parts))
