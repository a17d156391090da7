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


class RegionTable:
    """The set of registered [addr, addr + length) regions; safe to read while another adds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (starts, ends), sorted by start; replaced as a whole so readers need no lock
        self._regions: tuple[np.ndarray, np.ndarray] = (
            np.empty(0, np.uint64),
            np.empty(0, np.uint64),
        )

    def add(self, addr: int, length: int) -> None:
        if addr <= 0 or length <= 0:
            raise ValueError(f"cannot register addr={addr:#x} length={length}")
        with self._lock:
            starts, ends = self._regions
            starts = np.append(starts, np.uint64(addr))
            ends = np.append(ends, np.uint64(addr + length))
            order = np.argsort(starts, kind="stable")
            self._regions = (starts[order], ends[order])

    def __len__(self) -> int:
        return len(self._regions[0])

    def first_outside(self, addrs: np.ndarray, lengths: np.ndarray) -> int | None:
        """Index of the first range not inside one registered region, or None if all are."""
        starts, ends = self._regions
        if len(addrs) == 0:
            return None
        if len(starts) == 0:
            return 0
        idx = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        inside = (idx >= 0) & (addrs + lengths <= ends[np.maximum(idx, 0)])
        bad = np.flatnonzero(~inside)
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
