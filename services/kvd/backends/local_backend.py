"""Same-node transfers: both pools are mapped into this kvd process, so a write is a memmove.

kvd maps every local worker's pool (shared memory on CPU), so when prefill and decode share a
host their pages are both in kvd's address space and no transfer library is needed. The peer
is this very process: `metadata()` names the pid, and `connect()` refuses a blob from another
process. Any host memory works and registering is optional; but once a region is registered,
every source and destination range must lie in a registered region, and a range that does not
raises `TransferError` instead of faulting the process (so kvd should register every local
pool here too). Host memory only: a GPU same-node path (CUDA IPC peer copy) is another backend.
"""

from __future__ import annotations

import ctypes
import os

from services.kvd.backends.base import BackendUnavailable, TransferError
from services.kvd.backends.shared import RegionTable, batch_arrays

_PREFIX = b"tandem-local:"
PEER = "local"


class LocalBackend:
    name = "local"

    def __init__(self, *, mem_type: str = "DRAM") -> None:
        if mem_type != "DRAM":
            raise BackendUnavailable(
                f"the local backend copies host memory only, not {mem_type}; "
                "a same-node GPU path needs CUDA IPC, which this build does not have"
            )
        self._regions = RegionTable()
        self._is_closed = False

    def register(self, addr: int, length: int) -> None:
        self._regions.add(addr, length)

    def metadata(self) -> bytes:
        return _PREFIX + str(os.getpid()).encode()

    def connect(self, peer_metadata: bytes) -> str:
        if not peer_metadata.startswith(_PREFIX):
            raise TransferError("local backend: peer metadata is not from a local backend")
        pid = peer_metadata[len(_PREFIX) :].decode(errors="replace")
        if pid != str(os.getpid()):
            raise TransferError(
                f"local backend: peer is process {pid}, not this one ({os.getpid()}); "
                "the local path only copies between pools mapped in one kvd"
            )
        return PEER

    def write(self, peer: str, src: list[tuple[int, int]], dst_addrs: list[int]) -> None:
        src_addrs, lengths, dsts = batch_arrays(src, dst_addrs)
        if self._is_closed:
            raise TransferError(f"local backend: write to {peer} after close")
        if peer != PEER:
            raise TransferError(f"local backend: unknown peer {peer!r} (connect first)")
        for what, addrs in (("source", src_addrs), ("destination", dsts)):
            bad = self._regions.first_outside(addrs, lengths) if len(self._regions) else None
            if bad is not None:
                raise TransferError(
                    f"local backend: {what} [{int(addrs[bad]):#x}, +{int(lengths[bad])}) of "
                    f"descriptor {bad} is outside every registered region"
                )
        # ctypes.memmove releases the GIL, so writes from several threads copy in parallel
        for s, n, d in zip(src_addrs.tolist(), lengths.tolist(), dsts.tolist(), strict=True):
            ctypes.memmove(d, s, n)

    def close(self) -> None:
        self._is_closed = True
