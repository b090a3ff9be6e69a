"""Letting go of a model's file-backed weight pages while something else does the model's work.

A checkpoint loaded in its stored dtype is a copy-on-write mapping of the file (checkpoints/io.py): its pages are
read when first used and then stay resident. Once OpenVINO runs a module from its own copy of the weights, the
torch module's pages are dead weight (3.2 GiB for a float32 SD 1.5 UNet). `release_file_pages` unmaps them from
this process; the kernel's page cache keeps them while memory allows, so a later use (a call the graph cannot
serve) reads them back from it, or from the file.

Only pages still shared with the file are let go of, as /proc/self/pagemap tells: a page this process wrote (a
weight changed in place holds a private copy) and anonymous memory (weights cast while loading) are kept, so no
value is ever lost. Linux only; elsewhere, or where pagemap cannot be read, nothing is released. Call it when
nothing writes the tensors meanwhile (a page written between the look and the release would lose the write).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterable

import numpy as np
from torch import Tensor

MADV_DONTNEED = 4
PRESENT = np.uint64(1 << 63)
FILE_PAGE = np.uint64(1 << 61)  # "file-page or shared-anon" (pagemap.rst)


def release_file_pages(tensors: Iterable[Tensor]) -> int:
    """Unmap the whole pages of CPU `tensors`' memory that are resident and still the file's own; returns the
    bytes released (0 where there is nothing to release or the platform cannot)."""
    madvise = _madvise()
    if madvise is None:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            for tensor in tensors:
                if tensor.device.type != "cpu" or tensor.numel() == 0:
                    continue
                start = tensor.untyped_storage().data_ptr()
                first, end = -(-start // page), (start + tensor.untyped_storage().nbytes()) // page
                if end <= first:
                    continue
                pagemap.seek(first * 8)
                entries = np.frombuffer(pagemap.read((end - first) * 8), dtype=np.uint64)
                shared = (entries & (PRESENT | FILE_PAGE)) == (PRESENT | FILE_PAGE)
                for run_start, run_end in _runs(shared):
                    address, length = (first + run_start) * page, (run_end - run_start) * page
                    if madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_DONTNEED) == 0:
                        released += length
    except OSError:  # no pagemap (a restricted /proc): keep everything
        return released
    return released


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where the boolean `mask` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


@functools.cache
def _madvise():
    """libc's madvise, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise
