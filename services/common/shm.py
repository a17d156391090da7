"""Named shared-memory segments for KV pools: kvd creates them, workers map them.

Contract: `create_segment` (kvd only) makes `/dev/shm/<name>` of `size` bytes and maps it;
`map_segment` (workers) maps an existing one; `unlink_segment` (kvd only) removes the name —
mappings stay valid until unmapped. Unlike `multiprocessing.shared_memory`, nothing here
registers with Python's resource tracker, which would unlink a segment when a *worker* exits
and break the re-attach of a restarted worker.

Orphans. A kvd killed with SIGKILL (or by the OOM killer) cannot unlink its segments, and
/dev/shm keeps them — RAM — until reboot. kvd names its segments `owner_prefix()` + ...:
`tandem-kvd-<pid namespace>-<pid>-`; `remove_orphans` (a starting kvd) unlinks the segments
whose owner is gone: same pid namespace, no such process. Segments of live processes, of other
pid namespaces (containers sharing /dev/shm), of other users and names without an owner are
left alone.
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


PREFIX = "tandem-kvd-"


def owner_prefix() -> str:
    """`tandem-kvd-<pid namespace inode>-<pid>-`: what this process's segment names start with."""
    return f"{PREFIX}{_pid_namespace()}-{os.getpid()}-"


def remove_orphans() -> list[str]:
    """Unlink the segments of kvds that no longer exist (see the module docstring); returns
    the names removed."""
    namespace = _pid_namespace()
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}{namespace}-*"):
        pid_text = path.name[len(f"{PREFIX}{namespace}-"):].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _alive(int(pid_text)):
            continue
        try:
            path.unlink()
        except (FileNotFoundError, PermissionError):
            continue
        removed.append(path.name)
    return removed


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc: a namespace no orphan can claim
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def buffer_address(buf: mmap.mmap) -> int:
    """Virtual address of the first byte of a mapping (what a transfer backend registers)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))
