"""What the server can load, found by scanning its folders: the checkpoints (`--model`, `--models-dir`), the
LoRA files (`--lora-dir`), the ControlNets and IP-Adapters (`--controlnet-dir`) and the CLIP vision towers of the
IP-Adapter modules (`--clip-vision-dir`). A client names a model by a title from these lists, never by a path: a
name that is not listed is refused before it can reach the file system.

    Checkpoints("v1-5.safetensors", Path("models")).find("v1-5.safetensors [6ce0161689]") -> Checkpoint
    ControlNetModels(Path("controlnet")).find("control_v11p_sd15_canny [d14c016b]") -> ControlNetModel
    ClipVisionFiles(Path("clip_vision")).find("clip_h") -> Path("clip_vision/clip_h.pth")
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.lora import lora_files
from ..checkpoints.controlnet_files import WEIGHT_FILES as CONTROLNET_WEIGHT_FILES
from ..checkpoints.io import (
    detect_format, file_sha256, legacy_model_hash, read_pickle_checkpoint, read_safetensors_header,
)
from ..checkpoints.loading import DEFAULT_MODEL
from ..errors import CheckpointError, InvalidInputError
from ..request import suggestion
from .errors import ApiError
from .ip_adapter_modules import CLIP_VISION, EXTENSION_FOLDER

log = logging.getLogger("sdtorch.server")

MODEL_SUFFIXES = (".safetensors", ".ckpt")  # the single files A1111 lists from its models folder
DIFFUSERS_MARKER = "model_index.json"
CONTROLNET_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")  # the ControlNet extension's CN_MODEL_EXTS
IP_ADAPTER_PARTS = ("image_proj", "ip_adapter")  # an IP-Adapter file's two parts (its tensors' first names)
CLIP_VISION_SUFFIXES = (".safetensors", ".pth")  # clip_h.safetensors, clip_h.pth; else a transformers folder clip_h/


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


@dataclass(frozen=True)
class ControlNetModel:
    """One ControlNet (or T2I-Adapter, or IP-Adapter) of --controlnet-dir, named as the A1111 ControlNet extension
    names it."""

    name: str  # the file name without its suffix, or the diffusers folder's name
    path: Path  # what Pipeline.load_controlnet gets
    hash: str  # A1111's legacy 8-digit model hash of the weights file (checkpoints.io.legacy_model_hash)

    @property
    def title(self) -> str:
        """"name [hash]": the extension's model_list entry, and what the infotext's "ControlNet N" names."""
        return f"{self.name} [{self.hash}]"


class ControlNetModels:
    """The ControlNets (T2I- and IP-Adapters too) under `folder` (--controlnet-dir): single files (.safetensors,
    .pth, .pt, .ckpt, .bin) and diffusers folders (config.json beside a weights file), sorted by file name as the
    extension sorts them. `refresh()` scans again; hashes are kept per (file, size, modification time)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._kinds: dict[tuple[str, int, int], bool | None] = {}
        self.items: list[ControlNetModel] = []
        self.refresh()

    def refresh(self) -> None:
        self.items = self._scan()  # one assignment: a lookup running meanwhile sees the old list or the new

    def titles(self) -> list[str]:
        return [model.title for model in self.items]

    def find(self, name: str) -> ControlNetModel:
        """The model a client names, as the extension finds it: its title ("name [hash]"), else its name in any case,
        else the shortest name containing it. Only listed models are found: a path is refused, not opened."""
        if not name or name.strip() == "None":
            raise InvalidInputError("no ControlNet model selected: give model, a name from /controlnet/model_list")
        if "/" in name or "\\" in name:
            raise InvalidInputError(f"ControlNet model {name!r} is a path: the server takes only the names "
                                    "/controlnet/model_list gives (models in its --controlnet-dir)")
        items = self.items
        lower = name.lower()
        found = (next((m for m in items if m.title == name), None)
                 or next((m for m in items if m.name.lower() == lower), None)
                 or min((m for m in items if lower in m.name.lower()), key=lambda m: len(m.name), default=None))
        if found is not None:
            return found
        if self.folder is None:
            raise InvalidInputError(f"ControlNet model {name!r} not found: the server has no ControlNet folder "
                                    "(start it with --controlnet-dir DIR)")
        raise InvalidInputError(f"ControlNet model {name!r} not found{suggestion(name, self.titles())} Use a name "
                                "from /controlnet/model_list (?update=true rescans the folder)")

    def is_ip_adapter(self, model: ControlNetModel) -> bool | None:
        """Whether a listed model is an IP-Adapter (`image_proj` and `ip_adapter` tensors, the extension's test) rather
        than a ControlNet or T2I-Adapter; None when the file cannot be read (its loader will say why). Read once per
        (file, size, modification time): a safetensors file's header, a torch archive memory-mapped."""
        if model.path.is_dir():
            return False  # a diffusers folder: a ControlNet or T2I-Adapter
        try:
            stat = model.path.stat()
        except OSError:
            return None
        key = (str(model.path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._kinds:
            self._kinds[key] = _holds_ip_adapter(model.path)
        return self._kinds[key]

    def _scan(self) -> list[ControlNetModel]:
        if self.folder is None:
            return []
        found = []
        for root, dirs, files in os.walk(self.folder):
            dirs.sort()
            here = Path(root)
            weights = next((n for n in CONTROLNET_WEIGHT_FILES if n in files), None) if "config.json" in files else None
            if weights is not None and here != self.folder:  # a diffusers folder: one model, its parts not listed
                found.append(self._model(here.name, here, here / weights))
                dirs.clear()
                continue
            for name in files:
                path = here / name
                stem, suffix = os.path.splitext(name)
                if suffix.lower() in CONTROLNET_SUFFIXES and stem != "None" and path.is_file():
                    found.append(self._model(stem, path, path))
        return sorted((m for m in found if m is not None), key=lambda m: (m.path.name, str(m.path)))

    def _model(self, name: str, path: Path, weights: Path) -> ControlNetModel | None:
        try:
            stat = weights.stat()
            key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = legacy_model_hash(weights)
        except OSError as e:
            log.warning("ControlNet %s not listed: %s", path, e)
            return None
        return ControlNetModel(name, path, self._hashes[key])


def _holds_ip_adapter(path: Path) -> bool | None:
    """Whether a model file has both IP-Adapter parts, as top-level dicts (IP-Adapter's .bin) or key prefixes
    (its .safetensors); None if unreadable."""
    try:
        kind = detect_format(path)
        if kind == "safetensors":
            keys = list(read_safetensors_header(path)[0])
        else:
            obj = None
            if kind == "zip":  # memory-mapped: the names without reading the tensors
                try:
                    obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except Exception:  # an archive that cannot be mapped: read it whole below
                    obj = None
            if obj is None:
                obj = read_pickle_checkpoint(path)
            keys = [k for k in obj if isinstance(k, str)] if isinstance(obj, dict) else []
    except Exception:  # unreadable, damaged, refused: the loader that runs next says why
        return None
    return all(any(k == part or k.startswith(part + ".") for k in keys) for part in IP_ADAPTER_PARTS)


class ClipVisionFiles:
    """The CLIP vision towers of the IP-Adapter modules in `folder` (--clip-vision-dir), named as the A1111
    ControlNet extension names them in its annotator/downloads/clip_vision/: `clip_h.pth` (ViT-H/14),
    `clip_g.pth` (ViT-bigG/14); also `<name>.safetensors` or a transformers folder `<name>/`. Only these names are
    looked up: a client never names the file."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def find(self, name: str, wanted_by: str) -> Path:
        """The tower file (or folder) called `name` ("clip_h", "clip_g"); `wanted_by` (the unit and module) starts the
        InvalidInputError when it is not there."""
        what, url = CLIP_VISION[name]
        files = [f"{name}{suffix}" for suffix in CLIP_VISION_SUFFIXES]
        for candidate in files:
            if self.folder is not None and (self.folder / candidate).is_file():
                return self.folder / candidate
        if self.folder is not None and (self.folder / name).is_dir():
            return self.folder / name
        where = (f"the server has no CLIP vision folder: start it with --clip-vision-dir DIR holding {name}.pth"
                 if self.folder is None else
                 f"{name}.pth is not in the server's --clip-vision-dir (looked for {', '.join(files)} and a "
                 f"transformers folder {name}/)")
        raise InvalidInputError(f"{wanted_by} needs the CLIP vision tower {name}.pth ({what}): {where}. The A1111 "
                                f"ControlNet extension keeps it in {EXTENSION_FOLDER} (downloaded from {url})")
