"""Reading and writing tensor files safely.

The format is judged by content, never by extension: a safetensors header, a zip archive (torch.save),
or a legacy pickle. Pickles are only ever read with `torch.load(weights_only=True)`, which refuses to
build anything but tensors and plain containers, so a malicious `.ckpt` cannot run code.

safetensors files are mapped into memory (tensors in their stored dtype are views of the file, read when
used) or read tensor by tensor straight into the target dtype: peak memory is the loaded model plus one
tensor, with no float32 detour and no second copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import pickle
import re
import reprlib
import struct
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointError, InvalidInputError, UnsafeCheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range [begin, end) in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def describe_error(e: BaseException) -> str:
    """The exception as "Type: first sentence of its message", for wrapping a library's error in an sdtorch one."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].split('. ')[0]}" if lines else type(e).__name__


def _open(path: Path) -> BinaryIO:
    """`open(path, "rb")`, failing with a CheckpointError that says why (a folder, missing, no permission)."""
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def detect_format(path: str | os.PathLike) -> str:
    """Return "safetensors", "zip" (torch.save archive) or "pickle" (legacy torch.save), by content."""
    path = Path(path)
    with _open(path) as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[8:9] == b"{":  # 8-byte header length, then the JSON header
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[:1] != b"\x80" or header_len <= MAX_HEADER_BYTES:  # a pickle may have "{" at byte 8 too
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"{path} is neither a safetensors file nor a PyTorch checkpoint (first bytes {head[:8]!r})"
    )


def file_sha256(path: str | os.PathLike, start: int = 0) -> str:
    """The sha256 (hex) of a file's bytes from offset `start` on (A1111's model and LoRA hashes are cut from it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_folder(path: Path, fill: Callable[[Path], None]) -> None:
    """Write a folder atomically: `fill(staging)` writes it beside `path`, then it is renamed into place (an existing
    `path` moved aside first and removed only once the new one is in place). A failure leaves `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(staging)
        _replace_folder(staging, path)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; nothing was changed") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(new: Path, dst: Path) -> None:
    """Rename `new` to `dst`; an existing `dst` is moved aside first and removed only once `new` is in place."""
    if not dst.exists():
        os.replace(new, dst)
        return
    old = new.with_name(f"{new.name}.old")  # `new` has a unique name (mkdtemp), so this one is free too
    os.replace(dst, old)
    try:
        os.replace(new, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def weight_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype weights are loaded in: `dtype` (a floating-point torch.dtype) or float32; anything else is an error."""
    dtype = dtype or torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be a floating-point torch.dtype (torch.float16, ...), not {dtype!r}")
    return dtype


def read_json_object(path: str | os.PathLike, missing: str | None = None) -> dict:
    """A JSON object from `path`; a missing (message: `missing`, else "missing <path>"), unreadable or malformed
    file, or JSON that is not an object, is a CheckpointError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(missing or f"missing {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, an integer too long to parse, deep nesting
        raise CheckpointError(f"{path} is not valid JSON ({describe_error(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def legacy_model_hash(path: str | os.PathLike) -> str:
    """A1111's old short model hash (`sd_models.model_hash`, what the ControlNet extension names models by): the
    first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB (fewer bytes, or none, in a smaller file)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and validate the header: (tensor entries in file order, metadata, offset of the data section).

    Checked as strictly as the safetensors library does, before any tensor is read: a JSON object of
    entries with a known dtype, a shape and a byte range of exactly the shape's size, the ranges
    tiling the data section with no gap or overlap and ending at the end of the file.
    """
    path = Path(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (a {header_len}-byte header in a {size}-byte file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, an integer too long to parse, deep nesting
        raise CheckpointError(f"{path}: corrupt safetensors header ({describe_error(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings to strings)")
    entries = dict(sorted(
        ((name, _tensor_entry(path, name, value)) for name, value in header.items()),
        key=lambda item: (item[1].begin, item[1].end),
    ))
    data_start, data_size, covered = 8 + header_len, size - 8 - header_len, 0
    for name, entry in entries.items():
        if entry.begin < covered:
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r} overlaps the one before it)")
        if entry.begin > covered:
            raise CheckpointError(f"{path}: corrupt safetensors file (bytes {covered}-{entry.begin} are in no tensor)")
        covered = entry.end
    if covered > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes; the tensors end at {data_start + covered})"
        )
    if covered < data_size:
        raise CheckpointError(f"{path}: corrupt safetensors file ({data_size - covered} bytes after the last tensor)")
    return entries, metadata, data_start


def _tensor_entry(path: Path, name: str, value: object) -> TensorEntry:
    """One header entry, validated: a known dtype, a shape of non-negative ints, [begin, end) of the shape's size."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors entry for tensor {name!r} ({why})")

    def is_count(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63

    if not isinstance(value, dict):
        raise corrupt(f"a JSON {type(value).__name__}, not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise corrupt(f"dtype {reprlib.repr(dtype)} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise corrupt(f"shape {reprlib.repr(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise corrupt(f"data_offsets {reprlib.repr(offsets)} are not [begin, end] with 0 <= begin <= end")
    entry = TensorEntry(SAFETENSORS_DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    needed = math.prod(shape) * entry.dtype.itemsize
    if entry.end - entry.begin != needed:
        raise corrupt(f"{entry.end - entry.begin} bytes for shape {list(shape)} of {dtype}, which takes {needed}")
    return entry


def read_safetensors(
    path: str | os.PathLike, dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors (only those `keep(name)` accepts), floating ones cast to `dtype`; returns (tensors, metadata).

    With dtype=None tensors keep their stored dtype. A tensor that keeps its dtype is a copy-on-write view
    of the file mapped in memory (as the safetensors library gives): nothing is read until it is used, the
    page cache is shared, and writing to it never changes the file. A tensor cast to another dtype is read
    and converted one at a time (peak = model + one tensor). With device "meta" in mind, see `read_shapes`.
    """
    entries, metadata, data_start = read_safetensors_header(path)
    tensors: dict[str, torch.Tensor] = {}
    with _open(Path(path)) as f:
        mapped = _map_file(f)
        for name, entry in entries.items():
            if keep is not None and not keep(name):
                continue
            nbytes = entry.end - entry.begin
            offset = data_start + entry.begin
            if entry.dtype.is_floating_point and dtype is not None and entry.dtype != dtype:
                stored = _read_bytes(f, path, name, offset, nbytes)
            elif mapped is not None and nbytes and offset % entry.dtype.itemsize == 0:
                stored = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset)
            else:  # empty, or not aligned for its dtype (a view would be refused)
                stored = _read_bytes(f, path, name, offset, nbytes)
            tensor = stored.view(entry.dtype).reshape(entry.shape)  # bytes -> (shape) in the stored dtype
            if dtype is not None and tensor.is_floating_point() and entry.dtype != dtype:
                tensor = tensor.to(dtype)  # one tensor at a time: peak = model + this tensor
            tensors[name] = tensor
    return tensors, metadata


def _map_file(f: BinaryIO) -> mmap.mmap | None:
    """The whole file mapped copy-on-write (writes stay in this process), or None where it cannot be mapped."""
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):  # an empty file, a pipe, a file system without mmap
        return None


def _read_bytes(f: BinaryIO, path: str | os.PathLike, name: str, offset: int, nbytes: int) -> torch.Tensor:
    """`nbytes` bytes of `f` from `offset` into a new uint8 tensor; a clear CheckpointError on any failure."""
    try:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    except (MemoryError, RuntimeError):  # torch reports a failed allocation as a RuntimeError
        raise CheckpointError(f"{path}: not enough memory for tensor {name!r} ({nbytes:,} bytes)") from None
    try:
        f.seek(offset)
        complete = f.readinto(memoryview(buffer.numpy())) == nbytes
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not complete:  # the file shrank since its header was checked
        raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r})")
    return buffer


def read_shapes(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Meta tensors (shape and dtype, no data) for every entry of a safetensors file; cheap for any size."""
    entries, metadata, _ = read_safetensors_header(path)
    return {name: torch.empty(e.shape, dtype=e.dtype, device="meta") for name, e in entries.items()}, metadata


def read_pickle_checkpoint(path: str | os.PathLike) -> object:
    """`torch.load(weights_only=True)`; anything that would build an object or run code is refused."""
    path = Path(path)
    # a file object, not the path: torch.load would judge a path by its extension (".safetensors")
    with _open(path) as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported operand" in str(e):  # bytes that are no pickle instruction: damage, not a refusal
                raise CheckpointError(f"{path}: corrupt PyTorch checkpoint (its pickle is unreadable)") from None
            wanted = re.search(r"GLOBAL (\S+)", str(e))
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle: the file asks for "
                f"{wanted[1] if wanted else 'more than tensors'}, which is not a tensor or a plain container. "
                "Only weights are loaded from .ckpt files; convert trusted files to .safetensors."
            ) from None
        except Exception as e:  # torch.load of a damaged archive or pickle can fail with nearly any exception type
            raise CheckpointError(f"{path}: corrupt or truncated PyTorch checkpoint ({describe_error(e)})") from None


def read_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read any supported checkpoint file into (flat tensors, metadata strings).

    Nested `state_dict` entries are unwrapped; scalar entries of a pickle (e.g. `global_step`) are
    returned as metadata strings, other non-tensor entries (optimizer state, ...) are skipped.
    """
    kind = detect_format(path)
    if kind == "safetensors":
        return read_safetensors(path, dtype)
    obj = read_pickle_checkpoint(path)
    metadata: dict[str, str] = {}
    where = "its top level"
    while isinstance(obj, dict) and "state_dict" in obj:
        metadata.update({k: str(v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float))})
        obj, where = obj["state_dict"], "its state_dict"
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {where} is a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: {where} has a key {reprlib.repr(name)}; tensor names are strings")
        if isinstance(value, torch.Tensor):
            tensors[name] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        elif isinstance(value, (str, int, float)):
            metadata[name] = str(value)
    return tensors, metadata


_FILLING: set[str] = set()  # absolute paths of the temp files atomic_write calls are filling now


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], exclusive: bool = False) -> None:
    """Run `write(temp_path)` for a temp file beside `path`, then move the finished file to `path`.

    exclusive=False replaces an existing `path`. exclusive=True never does: the file is linked into
    place, which fails with FileExistsError when the name is taken (atomically, so concurrent writers
    never share a name). On any failure (full disk, interrupted write) the temp file is removed and
    `path` is untouched; OSErrors other than that FileExistsError become CheckpointError.

    A `write` may call a writer that is itself atomic (`save_png`, `write_safetensors`) on its temp path:
    that inner atomic_write writes the temp file directly, so the outer call's rules and messages hold.
    """
    path = Path(path)
    if os.path.abspath(path) in _FILLING:
        write(str(path))
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"could not write {path}: {e.strerror or e} ({e.filename}); nothing was changed") from None
    os.close(fd)
    _FILLING.add(os.path.abspath(tmp))
    try:
        write(tmp)
        # mkstemp makes 0600 (and a writer may replace the file itself): give the result an ordinary file's mode
        os.chmod(tmp, 0o666 & ~_umask())
        if exclusive:
            _link_new(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        if exclusive and isinstance(e, FileExistsError):
            raise
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; nothing was changed") from None
    finally:
        _FILLING.discard(os.path.abspath(tmp))
        Path(tmp).unlink(missing_ok=True)


def _link_new(tmp: str, path: Path) -> None:
    """Give the finished file `tmp` the name `path` only if no file has it (FileExistsError otherwise).

    A hard link does this in one step. Where the file system has none (FAT, some network shares) the
    name is claimed with O_CREAT | O_EXCL and the file renamed over the claim.
    """
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:
        pass  # no hard links here
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write tensors (made contiguous, on CPU) as safetensors."""
    from safetensors.torch import save_file

    cpu: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        storage = value.untyped_storage().data_ptr()
        if storage in seen_storages:  # views of one tensor (e.g. split q/k/v) must be stored apart
            value = value.clone()
        seen_storages.add(value.untyped_storage().data_ptr())
        cpu[name] = value
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Atomically write pretty JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    atomic_write(path, write)
