"""OpenVINO's compiled graphs kept on disk, so that a later process skips converting and compiling.

Converting the SD UNet with `openvino.convert_model` and compiling it takes about a minute per graph on a small CPU
and leaves the tracer's memory behind; importing the exported graph takes about a second, mapped from its file.
A graph is found by a key over everything that decides it: the module's weights (every parameter and buffer,
byte for byte), its structure and settings, the example's shapes and dtypes, the compute precision, sdtorch's own
source code, the OpenVINO version and the CPU. A changed weight, LoRA fused in, edited model code or another
machine is another key, never a stale graph.

Where: $SDTORCH_OPENVINO_CACHE, else $XDG_CACHE_HOME/sdtorch/openvino (~/.cache/sdtorch/openvino);
SDTORCH_OPENVINO_CACHE=off keeps nothing. Each graph is one file about the size of its weights at the compute
precision (1.6 GiB for an SD 1.5 UNet in bfloat16); beyond MAX_CACHE_BYTES the least recently used go. Writes are
atomic (temp file + rename); a file that cannot be imported is removed and the graph built again. An imported graph
reads its weights from the file mapped copy-on-write, and its pages are let go of during and after the first
inference, in which OpenVINO repacks them, and after each later one (`pages_let_go`); a graph just built is read
back from its file the same way, so it no longer needs the tensors it was traced from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import hashlib
import mmap
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .resident import release_file_pages

CACHE_ENV = "SDTORCH_OPENVINO_CACHE"
OFF_VALUES = ("off", "0", "none", "")
MAX_CACHE_BYTES = 16 * 2**30
FORMAT = b"sdtorch-openvino-graph-1"
SUFFIX = ".ovblob"


def cache_dir() -> Path | None:
    """The folder compiled graphs are kept in, or None where $SDTORCH_OPENVINO_CACHE turns the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in OFF_VALUES else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdtorch" / "openvino"


def graph_key(module: nn.Module, example: tuple[Tensor, ...], hints: dict[str, Any]) -> str:
    """A hex digest naming the graph `module` traced on `example` and compiled with OpenVINO `hints` would be."""
    import openvino as ov

    digest = hashlib.sha256(FORMAT)
    core = ov.Core()
    machine = (ov.get_version(), core.get_property("CPU", "FULL_DEVICE_NAME"),
               core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    digest.update(repr((machine, _source_digest(), sorted(hints.items()))).encode())
    digest.update(repr([(tuple(x.shape), x.dtype) for x in example]).encode())
    for name, sub in module.named_modules():
        digest.update(repr((name, type(sub).__qualname__, _settings(sub))).encode())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(repr((name, tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        release_file_pages([tensor])  # reading the weights for a key must not leave them all resident
    return digest.hexdigest()[:40]


def load(key: str, config: dict[str, Any]) -> tuple[Any, Any] | None:
    """(compiled graph, its file's mapping) kept under `key`, imported for this CPU with `config`, or None (absent,
    off, or a file that does not import: removed, with a warning). The graph reads its weights from the mapping:
    keep the mapping referenced as long as the graph."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}{SUFFIX}"
    if not path.is_file():
        return None
    import numpy as np
    import openvino as ov

    try:
        with path.open("rb") as file:  # copy-on-write: pages read as used, never written back
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        compiled = ov.Core().import_model(ov.Tensor(np.frombuffer(mapping, np.uint8), shared_memory=True), "CPU",
                                          config)
    except Exception as error:  # OpenVINO raises RuntimeError subclasses of its own for a bad blob
        warnings.warn(f"removing the OpenVINO cache file {path}, which does not import ({error}); building the "
                      "graph again", stacklevel=3)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # recently used: evicted last
    return compiled, mapping


@contextlib.contextmanager
def pages_let_go(mapping: mmap.mmap, during: bool, every: float = 0.05) -> Iterator[None]:
    """After the block (an imported graph's inference), and with `during` also every `every` seconds while it runs,
    let go of the graph file's pages this process holds (resident.py: only pages still the file's); a page read
    again comes back from the file. The first inference repacks the weights into OpenVINO's own buffers: let go of
    during it, the file's pages and the repacked copy are not held together (1.6 GiB for an SD UNet in bfloat16).
    Later inferences read again the constants OpenVINO did not repack (0.2 GiB for the SD UNet): let go of after
    each, for the price of one look at the page table (7 ms per 1.6 GiB here)."""
    view = torch.frombuffer(mapping, dtype=torch.uint8)
    done = threading.Event()

    def let_go() -> None:
        while not done.wait(every):
            release_file_pages([view])

    thread = threading.Thread(target=let_go, name="sdtorch-openvino-pages", daemon=True) if during else None
    if thread is not None:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread is not None:
            thread.join()
        release_file_pages([view])


def store(key: str, compiled) -> None:
    """Keep `compiled` (an OpenVINO CompiledModel) under `key`, atomically; then evict the least recently used files
    beyond MAX_CACHE_BYTES. A failed write (full disk, read-only folder) warns and keeps nothing."""
    folder = cache_dir()
    if folder is None:
        return
    path = folder / f"{key}{SUFFIX}"
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            blob = compiled.export_model()
            out.write(blob.getbuffer() if hasattr(blob, "getbuffer") else blob)
            del blob
        os.replace(tmp, path)
    except OSError as error:
        warnings.warn(f"could not keep the OpenVINO graph in {folder} ({error}); the next process builds it again",
                      stacklevel=3)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return
    _evict(folder, keep=path)


def _evict(folder: Path, keep: Path) -> None:
    """Remove the least recently used graph files until the folder's hold at most MAX_CACHE_BYTES (never `keep`);
    files another process removes meanwhile are skipped."""
    sizes = {}
    for path in folder.glob(f"*{SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            sizes[path] = (stat.st_mtime, stat.st_size)
    total = 0
    for path in sorted(sizes, key=lambda p: sizes[p][0], reverse=True):
        total += sizes[path][1]
        if total > MAX_CACHE_BYTES and path != keep:
            path.unlink(missing_ok=True)


@functools.cache
def _source_digest() -> str:
    """sha256 over sdtorch's own .py files: edited model code names new graphs."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _settings(module: nn.Module) -> list[tuple[str, str]]:
    """A module's plain attributes (config dataclasses, numbers, strings, flags), which shape what it traces to."""
    plain = (bool, int, float, str, type(None), tuple, list, torch.dtype, enum.Enum)
    return sorted((name, repr(value)) for name, value in vars(module).items()
                  if not name.startswith("_") and (isinstance(value, plain) or dataclasses.is_dataclass(value)))
