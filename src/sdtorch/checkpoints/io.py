"""Reading and writing tensor files safely.

The format is judged by content, never by extension: a safetensors header, a zip archive (torch.save),
or a legacy pickle. Pickles are only ever read with `torch.load(weights_only=True)`, which refuses to
build anything but tensors and plain containers, so a malicious `.ckpt` cannot run code.

safetensors files are read tensor by tensor straight into the target dtype: peak memory is the loaded
model plus one tensor, with no float32 detour and no second copy.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsafeCheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def detect_format(path: str | os.PathLike) -> str:
    """Return "safetensors", "zip" (torch.save archive) or "pickle" (legacy torch.save), by content."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(
        f"{path} is neither a safetensors file nor a PyTorch checkpoint (first bytes {head[:8]!r})"
    )


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and validate the header: (tensor entries, metadata, offset of the data section)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header runs past the end)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: corrupt safetensors entry for {name!r} (size does not match shape)")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file ({size} bytes, tensor {name!r} needs {data_start + end})"
            )
    return header, metadata, data_start


def read_safetensors(
    path: str | os.PathLike, dtype: torch.dtype | None = None, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors (only those `keep(name)` accepts), floating ones cast to `dtype`; returns (tensors, metadata).

    With dtype=None tensors keep their stored dtype. With device "meta" in mind, see `read_shapes`.
    """
    header, metadata, data_start = read_safetensors_header(path)
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if keep is not None and not keep(name):
                continue
            begin, end = entry["data_offsets"]
            stored = SAFETENSORS_DTYPES[entry["dtype"]]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(data_start + begin)
            if f.readinto(memoryview(buffer.numpy())) != end - begin:
                raise CheckpointError(f"{path}: truncated safetensors file (tensor {name!r})")
            tensor = buffer.view(stored).reshape(entry["shape"])  # bytes -> (shape) in the stored dtype
            if dtype is not None and tensor.is_floating_point() and stored != dtype:
                tensor = tensor.to(dtype)  # one tensor at a time: peak = model + this tensor
            tensors[name] = tensor
    return tensors, metadata


def read_shapes(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Meta tensors (shape and dtype, no data) for every entry of a safetensors file; cheap for any size."""
    header, metadata, _ = read_safetensors_header(path)
    return {
        name: torch.empty(e["shape"], dtype=SAFETENSORS_DTYPES[e["dtype"]], device="meta") for name, e in header.items()
    }, metadata


def read_pickle_checkpoint(path: str | os.PathLike) -> dict:
    """`torch.load(weights_only=True)`; anything that would build an object or run code is refused."""
    path = Path(path)
    try:
        # a file object, not the path: torch.load would judge a path by its extension (".safetensors")
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: the file asks for more than tensors ({first_line}). "
            "Only weights are loaded from .ckpt files; convert trusted files to .safetensors."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read any supported checkpoint file into (flat tensors, metadata strings).

    Nested `state_dict` entries are unwrapped; non-tensor entries of a pickle (e.g. `global_step`) are
    returned as metadata strings.
    """
    kind = detect_format(path)
    if kind == "safetensors":
        return read_safetensors(path, dtype)
    obj = read_pickle_checkpoint(path)
    metadata: dict[str, str] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        metadata.update({k: str(v) for k, v in obj.items() if not isinstance(v, (dict, torch.Tensor))})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        elif not isinstance(value, dict):
            metadata[name] = str(value)
    return tensors, metadata


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run `write(temp_path)` for a temp file beside `path`, then rename it over `path`.

    On any failure (full disk, interrupted write) the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 (and a writer may replace the file itself): give the result an ordinary file's mode
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {e.strerror or e}; nothing was changed") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
