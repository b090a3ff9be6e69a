"""The job queue: one worker thread runs the tasks (generations, model loads) one at a time, first come first
served, and each task's `Progress` is what /sdapi/v1/progress reports.

Interrupt and skip are flags on the running task's Progress. The sampler calls `Progress.on_step` after every
step, which raises `Interrupted` or `Skipped` when a flag is up: the job stops between two steps, never inside
one, and the exception unwinds generation cleanly (LoRAs of the prompt are removed on the way out).
A task whose client went away while it waited (its future cancelled) is dropped without running.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling.common import Step
from .encoding import encode_png
from .preview import LatentPreview


class Interrupted(Exception):
    """The running job was interrupted: it stops, answering with the images finished so far."""


class Skipped(Exception):
    """The running iteration was skipped: the job goes on with the next one."""


@dataclass
class Progress:
    """Where one task is (A1111's `shared.state`), written by the worker and read by /progress."""

    task_id: str
    job: str  # "txt2img", "img2img" or "load"
    job_count: int = 0  # iterations (A1111's n_iter)
    job_no: int = 0  # the iteration running, from 0
    sampling_step: int = 0  # steps done in this pass
    sampling_steps: int = 0
    started: float = field(default_factory=time.monotonic)
    job_timestamp: str = "0"  # when it started, as A1111 writes it
    interrupted: bool = False
    skipped: bool = False
    preview: LatentPreview | None = None  # the model's preview maker, set when the job starts
    latents: torch.Tensor | None = None  # (C, h, w): the first image's x0 estimate after the last step
    _shown: tuple[tuple[int, int, int], str] | None = field(default=None, repr=False)  # (step, preview) last made

    def begin_iteration(self, index: int) -> None:
        self.job_no, self.sampling_step, self.skipped, self.latents = index, 0, False, None

    def on_step(self, step: Step) -> None:
        """The sampler callback: record the step, then stop if interrupted or skipped."""
        self.sampling_step, self.sampling_steps = step.index + 1, step.total
        self.latents = step.denoised[0].detach().clone()
        if self.interrupted:
            raise Interrupted
        if self.skipped:
            raise Skipped

    def preview_png(self) -> str | None:
        """The current x0 estimate as a base64 PNG (None before the first step), made at most once per step
        however many clients poll."""
        latents, preview, step = self.latents, self.preview, (self.job_no, self.sampling_step, self.sampling_steps)
        if latents is None or preview is None:
            return None
        if self._shown is None or self._shown[0] != step:
            self._shown = (step, encode_png(preview.image(latents)))
        return self._shown[1]

    def fraction(self) -> float:
        """0..1 of the whole job: finished iterations plus the running one's share of steps."""
        if self.job_count <= 0:
            return 0.0
        done = self.job_no + (self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0)
        return min(done / self.job_count, 1.0)

    def eta(self) -> float:
        """Seconds left, extrapolated from the time so far (0 before the first step)."""
        fraction = self.fraction()
        elapsed = time.monotonic() - self.started
        return elapsed / fraction - elapsed if fraction > 0 else 0.0

    def textinfo(self) -> str:
        if self.job == "load":
            return "loading the model"
        step = f"step {self.sampling_step}/{self.sampling_steps}"
        return f"{self.job}: iteration {self.job_no + 1}/{self.job_count}, {step}"


@dataclass
class Task:
    progress: Progress
    work: Callable[[Progress], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class TaskQueue:
    """FIFO of tasks run one at a time by one worker thread (so only that thread touches the models)."""

    def __init__(self) -> None:
        self._pending: deque[Task] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self.current: Task | None = None
        self._thread = threading.Thread(target=self._work, name="sdtorch-worker", daemon=True)
        self._thread.start()

    def new_id(self, kind: str) -> str:
        return f"task({kind}-{next(self._ids)})"

    def submit(self, progress: Progress, work: Callable[[Progress], Any]) -> concurrent.futures.Future:
        """Queue `work(progress)`; the future holds its result or exception."""
        task = Task(progress, work)
        with self._wake:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._pending.append(task)
            self._wake.notify()
        return task.future

    def pending(self) -> list[str]:
        with self._wake:
            return [task.progress.task_id for task in self._pending]

    def interrupt(self) -> None:
        """Stop the running task between two sampler steps (queued tasks are not touched)."""
        task = self.current
        if task is not None:
            task.progress.interrupted = True

    def skip(self) -> None:
        """End the running iteration; the task goes on with its next one."""
        task = self.current
        if task is not None:
            task.progress.skipped = True

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking tasks, interrupt the running one, fail the queued ones and end the worker."""
        with self._wake:
            self._closed = True
            dropped, self._pending = list(self._pending), deque()
            self._wake.notify()
        for task in dropped:
            task.future.cancel()
        self.interrupt()
        self._thread.join(timeout)

    def _next(self) -> Task | None:
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            return self._pending.popleft() if self._pending else None

    def _work(self) -> None:
        while (task := self._next()) is not None:
            if not task.future.set_running_or_notify_cancel():
                continue  # its client went away while it waited
            self.current = task
            task.progress.started = time.monotonic()
            task.progress.job_timestamp = time.strftime("%Y%m%d%H%M%S")
            try:
                task.future.set_result(task.work(task.progress))
            except BaseException as e:  # handed to the waiting request; the worker goes on
                task.future.set_exception(e)
            finally:
                self.current = None
