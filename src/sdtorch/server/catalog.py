"""What the server can load, found by scanning its folders: the checkpoints (`--model`, `--models-dir`) and the
LoRA files (`--lora-dir`). A client names a model by a title from these lists, never by a path: a name that
is not listed is refused before it can reach the file system.

    Checkpoints("v1-5.safetensors", Path("models")).find("v1-5.safetensors [6ce0161689]") -> Checkpoint
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..adapters.lora import lora_files
from ..checkpoints.io import detect_format, file_sha256, read_safetensors_header
from ..checkpoints.loading import DEFAULT_MODEL
from ..errors import CheckpointError
from .errors import ApiError

MODEL_SUFFIXES = (".safetensors", ".ckpt")  # the single files A1111 lists from its models folder
DIFFUSERS_MARKER = "model_index.json"


@dataclass(frozen=True)
class Checkpoint:
    """One loadable model, as A1111's sd-models lists it."""

    name: str  # the file's path under --models-dir (A1111's name), the folder's name, or --model as given
    source: str | None  # what sdtorch.load() gets (None: the built-in model)
    filename: str  # where it is
    sha256: str | None = None  # single files only (folders and hub ids have no A1111 hash)

    @property
    def hash(self) -> str | None:
        """A1111's short hash: sha256[:10]."""
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        """A1111's title: "name [hash]", or the name alone without a hash."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    @property
    def model_name(self) -> str:
        """A1111's model_name: the name without its extension, folders joined by "_"."""
        stem = self.name[: -len(Path(self.name).suffix)] if self.name.lower().endswith(MODEL_SUFFIXES) else self.name
        return stem.replace("/", "_").replace("\\", "_")

    def names(self) -> set[str]:
        """Every name a client may select it by (A1111's checkpoint aliases)."""
        return {n for n in (self.title, self.name, self.model_name, self.hash, self.sha256) if n}

    def item(self) -> dict[str, str | None]:
        """The entry of GET /sdapi/v1/sd-models."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.filename, "config": None}


class Checkpoints:
    """The models the server offers: `first` (--model; None: the built-in model), then every single file
    (.safetensors, .ckpt) and diffusers folder under `folder` (--models-dir). `refresh()` scans again; sha256
    sums are kept per (file, size, modification time), so a rescan hashes only what changed."""

    def __init__(self, first: str | None, folder: Path | None):
        self.first_source, self.folder = first, folder
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.items: list[Checkpoint] = []
        self.refresh()

    def refresh(self) -> None:
        found = [self._first(), *self._scan()]
        seen, items = set(), []
        for checkpoint in found:  # --model may also sit in --models-dir
            key = os.path.realpath(checkpoint.filename) if os.path.exists(checkpoint.filename) else checkpoint.filename
            if key not in seen:
                seen.add(key)
                items.append(checkpoint)
        self.items = items

    @property
    def default(self) -> Checkpoint:
        return self.items[0]

    def find(self, name: str) -> Checkpoint:
        """The checkpoint a client names (title, name, model_name or hash); ApiError 400 if none is listed."""
        for checkpoint in self.items:
            if name in checkpoint.names():
                return checkpoint
        raise ApiError(400, f"Model not found: {name!r}; use a title from /sdapi/v1/sd-models "
                            "(POST /sdapi/v1/refresh-checkpoints after adding files)")

    def _first(self) -> Checkpoint:
        if self.first_source is None:
            return Checkpoint(DEFAULT_MODEL.name, None, str(DEFAULT_MODEL))
        path = Path(self.first_source).expanduser()
        if path.is_file():
            return Checkpoint(path.name, str(path), str(path), self._sha256(path))
        if path.is_dir():
            return Checkpoint(path.name, str(path), str(path))
        return Checkpoint(self.first_source, self.first_source, self.first_source)  # a hub id

    def _scan(self) -> list[Checkpoint]:
        if self.folder is None:
            return []
        found = []
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()
            here = Path(root)
            if DIFFUSERS_MARKER in files and here != self.folder:
                found.append(Checkpoint(here.relative_to(self.folder).as_posix(), str(here), str(here)))
                dirs.clear()  # a diffusers folder's parts are not models of their own
                continue
            for name in sorted(files):
                path = here / name
                if name.lower().endswith(MODEL_SUFFIXES) and path.is_file():
                    found.append(Checkpoint(path.relative_to(self.folder).as_posix(), str(path), str(path),
                                            self._sha256(path)))
        return found

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return self._hashes[key]


@dataclass(frozen=True)
class Lora:
    """One LoRA file of --lora-dir, as A1111's /sdapi/v1/loras lists it."""

    name: str  # what <lora:name:weight> selects: the file's stem
    path: Path
    metadata: dict[str, str]

    def item(self) -> dict[str, object]:
        return {"name": self.name, "alias": self.metadata.get("ss_output_name") or self.name,
                "path": str(self.path), "metadata": self.metadata}


def scan_loras(folder: Path | None) -> list[Lora]:
    """The LoRA files under `folder` with their safetensors metadata (none for other files or unreadable ones)."""
    if folder is None:
        return []
    loras = []
    for name, path in lora_files(folder).items():
        metadata: dict[str, str] = {}
        try:
            if detect_format(path) == "safetensors":
                metadata = read_safetensors_header(path)[1]
        except (CheckpointError, OSError):
            pass  # listed all the same; loading it will say what is wrong
        loras.append(Lora(name, path, metadata))
    return loras
