"""Named shared-memory segments for KV pools: kvd creates them, workers map them.

Contract: `create_segment` (kvd only) makes `/dev/shm/<name>` of `size` bytes and maps it;
`map_segment` (workers) maps an existing one; `unlink_segment` (kvd only) removes the name —
mappings stay valid until unmapped. Unlike `multiprocessing.shared_memory`, nothing here
registers with Python's resource tracker, which would unlink a segment when a *worker* exits
and break the re-attach of a restarted worker.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_MADV_POPULATE_WRITE = 23  # linux/mman.h


def create_segment(name: str, size: int) -> mmap.mmap:
    """A new zero-filled segment, its memory committed now (the first transfer into untouched
    pages was measured 5-19x slower than later ones: page faults on the receiving side);
    FileExistsError if the name is taken."""
    fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        buf = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:  # Linux >= 5.14; Python names the constant only from 3.14 on
        buf.madvise(getattr(mmap, "MADV_POPULATE_WRITE", _MADV_POPULATE_WRITE))
    except OSError:  # older kernels: touch one byte per page
        for offset in range(0, size, mmap.PAGESIZE):
            buf[offset] = 0
    return buf


def map_segment(name: str, size: int) -> mmap.mmap:
    """Map an existing segment of at least `size` bytes."""
    fd = os.open(SHM_DIR / name, os.O_RDWR)
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise ValueError(f"shared memory {name} has {actual} bytes, expected {size}")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass


def buffer_address(buf: mmap.mmap) -> int:
    """Virtual address of the first byte of a mapping (what a transfer backend registers)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))
