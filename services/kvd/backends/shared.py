"""Helpers shared by the backends: batches as arrays, registered-region lookup, RDMA devices.

None imports a transfer library, so all are cheap to use from tests and from kvd.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from services.kvd.backends.base import BackendUnavailable

IB_SYSFS = Path("/sys/class/infiniband")


def batch_arrays(
    src: list[tuple[int, int]], dst_addrs: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src_addrs, lengths, dst_addrs) as uint64 arrays; ValueError on malformed input."""
    if len(src) != len(dst_addrs):
        raise ValueError(f"write got {len(src)} sources but {len(dst_addrs)} destinations")
    if not src:
        empty = np.empty(0, np.uint64)
        return empty, empty, empty
    pairs = np.asarray(src, dtype=np.int64)  # [num_descs, 2] = (addr, length)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError("write sources must be (addr, length) pairs")
    if (pairs[:, 1] <= 0).any() or (pairs[:, 0] < 0).any():
        raise ValueError("write sources need addr >= 0 and length > 0")
    dsts = np.asarray(dst_addrs, dtype=np.int64)
    if (dsts < 0).any():
        raise ValueError("write destinations need addr >= 0")
    return pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64), dsts.astype(np.uint64)


HOST = -1  # RegionTable tag of host memory; a tag >= 0 is the CUDA device of VRAM
OUTSIDE = -2  # `RegionTable.locate` of a range inside no registered region


def tag_of(mem_type: str, device_id: int) -> int:
    """The RegionTable tag of memory registered as `mem_type` ("DRAM" | "VRAM")."""
    if mem_type == "DRAM":
        return HOST
    if mem_type == "VRAM":
        if device_id < 0:
            raise ValueError(f"VRAM needs a device id >= 0, got {device_id}")
        return device_id
    raise ValueError(f"memory type must be DRAM or VRAM, not {mem_type!r}")


class RegionTable:
    """The set of registered [addr, addr + length) regions, each tagged with where it lives
    (HOST or a GPU index); safe to read while another thread adds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (starts, ends, tags), sorted by start; replaced as a whole so readers need no lock
        self._regions: tuple[np.ndarray, np.ndarray, np.ndarray] = (
            np.empty(0, np.uint64),
            np.empty(0, np.uint64),
            np.empty(0, np.int64),
        )

    def add(self, addr: int, length: int, tag: int = HOST) -> None:
        if addr <= 0 or length <= 0:
            raise ValueError(f"cannot register addr={addr:#x} length={length}")
        with self._lock:
            starts, ends, tags = self._regions
            starts = np.append(starts, np.uint64(addr))
            ends = np.append(ends, np.uint64(addr + length))
            tags = np.append(tags, np.int64(tag))
            order = np.argsort(starts, kind="stable")
            self._regions = (starts[order], ends[order], tags[order])

    def __len__(self) -> int:
        return len(self._regions[0])

    def regions(self) -> list[tuple[int, int, int]]:
        """[(addr, length, tag)] of every region, by address."""
        starts, ends, tags = self._regions
        return [(int(s), int(e - s), int(t)) for s, e, t in zip(starts, ends, tags, strict=True)]

    def locate(self, addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The tag of the region holding each range, OUTSIDE where no one region holds it."""
        starts, ends, tags = self._regions
        if len(starts) == 0:
            return np.full(len(addrs), OUTSIDE, np.int64)
        idx = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        safe = np.maximum(idx, 0)
        inside = (idx >= 0) & (addrs + lengths <= ends[safe])
        return np.where(inside, tags[safe], OUTSIDE)

    def first_outside(self, addrs: np.ndarray, lengths: np.ndarray) -> int | None:
        """Index of the first range not inside one registered region, or None if all are."""
        if len(addrs) == 0:
            return None
        bad = np.flatnonzero(self.locate(addrs, lengths) == OUTSIDE)
        return int(bad[0]) if bad.size else None


def check_ib_devices(ib_device: str) -> None:
    """BackendUnavailable unless every RDMA device named ("mlx5_0,mlx5_1", "mlx5_0:1") exists.

    Mooncake falls back to TCP silently when its device is missing; a flag whose hardware is
    missing must fail at start instead (DESIGN.md)."""
    wanted = [d.strip() for d in ib_device.split(",") if d.strip()]
    present = sorted(p.name for p in IB_SYSFS.iterdir()) if IB_SYSFS.is_dir() else []
    absent = [d for d in wanted if d.split(":")[0] not in present]  # "mlx5_0:1" = port 1
    if absent:
        raise BackendUnavailable(
            f"--disaggregation-ib-device {ib_device!r}: no RDMA device {', '.join(absent)} here "
            f"(present: {', '.join(present) or 'none'}); omit the flag to use TCP"
        )
