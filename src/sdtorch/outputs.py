"""Where generated images go, checked before generating, and files that never overwrite what is there.

`plan_outputs` reads the output argument before any work:

- an image file name (`x.png`, `x.jpg`, `x.jpeg`, `x.webp`): that file; a batch of n is `x-0.png` ...
  `x-{n-1}.png`. An existing file is replaced only with overwrite; another image suffix (`.gif`) is refused.
- anything else: a folder (created), where images get A1111's names `NNNNN-SEED.png`, the counter going
  on from the highest number already there, so that names never repeat, even after deletions.

`write_images` writes each image to a temp file and links it into place, so no half-written image is ever
seen and two processes writing to one folder never take the same name. PNGs carry the A1111 parameters
in their "parameters" chunk, JPEG and WEBP files in the EXIF UserComment, as A1111 writes them.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .checkpoints.io import atomic_write
from .errors import InvalidInputError
from .infotext import save_png

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
QUALITY = 95  # JPEG and WEBP
_NUMBERED = re.compile(r"(\d+)-")  # A1111's "00012-1234.png" (also "00012-1234-a prompt.png")


@dataclass(frozen=True)
class OutputPlan:
    """Where `write_images` puts a run's images, as `plan_outputs` decided and checked it.

    folder: the folder numbered files go to; None when `files` names them.
    files: one file name per image, when the output is a file name.
    overwrite: whether existing `files` may be replaced.
    """

    folder: Path | None
    files: tuple[Path, ...] = ()
    overwrite: bool = False


def plan_outputs(out: str | os.PathLike, count: int, overwrite: bool = False) -> OutputPlan:
    """Decide where `count` images go and check it can be written, before generating them.

    Raises InvalidInputError, naming the path, for an image suffix other than .png/.jpg/.jpeg/.webp, an
    existing file (unless `overwrite`), a folder where a file is meant or a file where a folder is, and a
    location where no file can be made (permission denied, read-only file system, a file in the path).
    """
    if count < 1:
        raise InvalidInputError(f"the number of images must be at least 1, got {count}")
    out = Path(out).expanduser()
    if out.suffix.lower() in IMAGE_FORMATS:
        if count == 1:
            files: tuple[Path, ...] = (out,)
        else:
            files = tuple(out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count))
        for path in files:
            if path.is_dir():
                raise InvalidInputError(f"{path} is a folder; name a new image file, or give the folder itself")
            if os.path.lexists(path) and not overwrite:
                raise InvalidInputError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        _check_writable(out.parent)
        return OutputPlan(None, files, overwrite)
    if out.suffix.lower() in Image.registered_extensions():
        raise InvalidInputError(
            f"cannot write {out.suffix} images ({out}): name a .png, .jpg, .jpeg or .webp file, or a folder"
        )
    if os.path.lexists(out) and not out.is_dir():
        raise InvalidInputError(f"{out} is a file, not a folder; name a folder, or an image file (.png, .jpg, .webp)")
    _check_writable(out)
    return OutputPlan(out)


def write_images(plan: OutputPlan, images: Sequence[Image.Image]) -> list[Path]:
    """Write `images` as `plan` says; returns the paths written, in order.

    Each image's `info["parameters"]` (the A1111 text) goes into its file. In a folder each image takes
    the next free number, counted afresh, named with its `info["seed"]`; a name another writer takes
    first moves it on to the next number. A failed write (full disk, ...) raises CheckpointError naming
    the file and leaves no temp file; images written before it stay.
    """
    if plan.folder is not None:
        unseeded = [i for i, image in enumerate(images) if "seed" not in image.info]
        if unseeded:
            raise InvalidInputError(f"image(s) {unseeded} carry no info['seed'] to name their files with")
        return [_write_numbered(plan.folder, image) for image in images]
    if len(images) != len(plan.files):
        raise InvalidInputError(f"the output plan names {len(plan.files)} file(s) for {len(images)} image(s)")
    for path, image in zip(plan.files, images):
        try:
            _write(image, path, exclusive=not plan.overwrite)
        except FileExistsError:
            raise InvalidInputError(
                f"{path} appeared while generating and was left as it is; pass overwrite=True (--overwrite)"
            ) from None
    return list(plan.files)


def _check_writable(folder: Path) -> None:
    """Create `folder` if needed and make (and remove) a file in it; InvalidInputError if either fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sdtorch-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in (folder, *folder.parents) if os.path.lexists(p))  # the deepest existing part
        raise InvalidInputError(f"cannot write images to {folder}: {blocker} is a file, not a folder") from None
    except OSError as e:
        raise InvalidInputError(f"cannot write images to {folder}: {e.strerror or e}") from None


def _next_number(folder: Path) -> int:
    """One past the highest NNNNN of the folder's `NNNNN-...` names; 0 when there is none."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise InvalidInputError(f"cannot list {folder}: {e.strerror or e}") from None
    return max((int(m.group(1)) for name in names if (m := _NUMBERED.match(name))), default=-1) + 1


def _write_numbered(folder: Path, image: Image.Image) -> Path:
    while True:
        path = folder / f"{_next_number(folder):05d}-{image.info['seed']}.png"
        try:
            _write(image, path, exclusive=True)
            return path
        except FileExistsError:
            continue  # another writer took this name first: count again


def _write(image: Image.Image, path: Path, exclusive: bool) -> None:
    """Write `image` with its parameters to `path` atomically; exclusive: FileExistsError if `path` is taken."""
    text = image.info.get("parameters", "")
    format = IMAGE_FORMATS[path.suffix.lower()]
    if format == "PNG":
        def write(tmp: str) -> None:
            save_png(image, tmp, text)  # nested in atomic_write: writes the temp file itself
    else:
        def write(tmp: str) -> None:
            image.save(tmp, format=format, quality=QUALITY, exif=_exif_user_comment(text) if text else b"")
    atomic_write(path, write, exclusive=exclusive)


def _exif_user_comment(text: str) -> bytes:
    """An EXIF block holding only `text` as UserComment, as A1111 writes it with piexif: type UNDEFINED,
    b"UNICODE\\0" + UTF-16 big-endian. Built by hand because Pillow's `Image.Exif` stores this tag as
    BYTE, which piexif (A1111's reader) returns as a tuple of numbers instead of bytes."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    header = b"MM" + struct.pack(">HI", 42, 8)  # big-endian TIFF; IFD0 at offset 8
    ifd0 = struct.pack(">HHHIII", 1, 0x8769, 4, 1, 26, 0)  # 1 entry: Exif IFD pointer (LONG) -> 26; no next IFD
    exif_ifd = struct.pack(">HHHIII", 1, 0x9286, 7, len(comment), 44, 0)  # 1 entry: UserComment (UNDEFINED) at 44
    return b"Exif\0\0" + header + ifd0 + exif_ifd + comment
