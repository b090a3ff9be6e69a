"""The loaded model: one at a time (as A1111 keeps one checkpoint), loaded and switched on the worker thread.

    host.get(checkpoint) -> LoadedModel(pipe, preview, embeddings)   # the loaded one, or this one loaded instead
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters.embeddings import FolderLoadReport, load_embeddings_dir
from ..checkpoints.loading import load
from ..pipeline import Pipeline
from ..request import Limits
from .catalog import Checkpoint
from .preview import LatentPreview

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    checkpoint: Checkpoint
    pipe: Pipeline
    preview: LatentPreview
    embeddings: FolderLoadReport  # what --embeddings-dir gave this model (empty without one)


class ModelHost:
    """Holds the one loaded model with the server's settings applied: limits, LoRA folder, embeddings, VAE."""

    def __init__(self, limits: Limits, lora_dir: Path | None, embeddings_dir: Path | None,
                 dtype: torch.dtype | None = None, compile: str | None = None,
                 refiner_lookup: Callable[[str], str | None] | None = None, vae: Path | None = None,
                 quantize: str | None = None):
        self.limits, self.lora_dir, self.embeddings_dir, self.dtype = limits, lora_dir, embeddings_dir, dtype
        self.refiner_lookup = refiner_lookup  # a request's refiner name -> a listed checkpoint's source
        self.compile, self.quantize = compile, quantize
        self.vae = vae  # a VAE file or folder given to each model in place of its own (Pipeline.load_vae)
        self.loaded: LoadedModel | None = None
        self._controlnets: tuple[int, frozenset[str]] = (0, frozenset())  # (the pipe's id, the ControlNets it holds)

    def get(self, checkpoint: Checkpoint) -> LoadedModel:
        """The model of `checkpoint`, loading it (and dropping the one before) if it is not the loaded one."""
        if self.loaded is not None and self.loaded.checkpoint == checkpoint:
            return self.loaded
        self.loaded = None
        gc.collect()  # free the old model's memory before the new one takes its own
        pipe = load(checkpoint.source, dtype=self.dtype).quantize(self.quantize).compile(self.compile)
        if self.vae is not None:
            pipe.load_vae(self.vae)
        pipe.limits, pipe.lora_dir, pipe.refiner_lookup = self.limits, self.lora_dir, self.refiner_lookup
        if checkpoint.sha256:
            pipe.model_hash = checkpoint.hash  # hashed when the folder was scanned: not read again
        embeddings = load_embeddings_dir(pipe, self.embeddings_dir) if self.embeddings_dir else FolderLoadReport()
        self.loaded = LoadedModel(checkpoint, pipe, LatentPreview(pipe.vae, pipe.vae_scale_factor), embeddings)
        return self.loaded

    def unload(self) -> None:
        """Drop the loaded model and free its memory (A1111's unload-checkpoint); the next job loads it again."""
        self.loaded = None
        gc.collect()

    def reload_embeddings(self) -> None:
        """Load the embeddings folder into the loaded model afresh (files added, changed or removed since)."""
        if self.loaded is not None and self.embeddings_dir is not None:
            self.loaded.pipe.unload_embedding()
            self.loaded.embeddings = load_embeddings_dir(self.loaded.pipe, self.embeddings_dir)

    def keep_controlnets(self, sources: set[str]) -> None:
        """Before a job that uses the ControlNets `sources`: drop those the loaded model keeps from earlier jobs
        unless they are the same, so memory holds one job's ControlNets at most (the extension keeps a few)."""
        if self.loaded is None or not sources:
            return
        pipe = self.loaded.pipe
        if self._controlnets != (id(pipe), frozenset(sources)):
            pipe.unload_controlnets()
            self._controlnets = (id(pipe), frozenset(sources))
