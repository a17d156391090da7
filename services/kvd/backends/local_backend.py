"""Same-node transfers: both pools live in this kvd process, so a write is a local copy.

kvd owns every local worker's pool (host shared memory, or VRAM it allocated on the worker's
GPU), so when prefill and decode share a host their pages are both in kvd's address space and no
transfer library is needed. The peer is this very process: `metadata()` names the pid, and
`connect()` refuses a blob from another process.

Copies. Host to host: memmove (releases the GIL, so threads copy in parallel). Any range in
VRAM: one `cudaMemcpyAsync` per descriptor (a coalesced page run), straight from the source
pages to the destination pages — GPU to GPU over NVLink / PCIe peer-to-peer (peer access is
enabled between every two GPUs that hold registered memory), no staging through the host — on
a stream of the writing thread's own, synchronized before `write` returns. On 2xH100 NV18 one
`cudaMemcpyAsync` of 512 MiB runs at 388 GB/s, as fast as torch's peer copy (383 GB/s) and
faster than an SM copy kernel (333-347 GB/s); cutting it over four streams gained nothing
(bench/peer_copy_gpu.py, bench/results/peer_copy-h100.json).

Queued copies (`write_async`, GPU to GPU only; `prepare_async` then `PreparedCopy.issue` split
the checks from the CUDA calls). The source GPU pushes: the copies are queued on the calling
thread's stream of the source GPU, between two timing events, and an interprocess CUDA event
is recorded after them on a stream of the destination GPU (which waits for them). Pulling
from the destination GPU's stream instead ran one 512 MiB run as fast but 256 runs of 2 MiB
at 3.4 ms instead of 2.0 ms (2xH100). The call returns at once with a `QueuedCopy`: its
`ready_event` (the event's IPC handle) lets another process order its own GPU work after the
copies, and `wait()` blocks until they are done. An event goes back to the pool only after
`wait()` saw its copies complete, so a process that waits on a handle late waits at worst on
a later room's copy, never on pages still unwritten. kvd uses this for the same-node path
when the decode worker accepts a ready event: its answer travels while the bytes do.

Checks. Any host memory works while nothing is registered; once a region is registered every
source and destination range must lie in a registered region, and a range that does not raises
`TransferError` instead of faulting the process (kvd registers every local pool here). VRAM is
only ever reached through registered regions. cuda-bindings is imported on the first VRAM
registration, never for host-only use.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.kvd.backends.base import TransferError
from services.kvd.backends.shared import HOST, OUTSIDE, RegionTable, batch_arrays, tag_of

logger = logging.getLogger(__name__)

_PREFIX = b"tandem-local:"
PEER = "local"


class LocalBackend:
    name = "local"

    def __init__(self) -> None:
        self._regions = RegionTable()
        self._lock = threading.Lock()  # guards the GPU set, the stream and event lists
        self._gpus: set[int] = set()  # devices holding registered VRAM
        self._streams: list[Any] = []  # every writing thread's streams (destroyed by close)
        self._thread = threading.local()  # .streams: dict[device, stream]
        self._events: list[_IpcEvent] = []  # every IPC event made (destroyed by close)
        self._free_events: dict[tuple[int, int], list[_IpcEvent]] = {}  # (source, dest) GPUs ->
        # events whose copies ended
        self._is_closed = False

    def register(
        self, addr: int, length: int, *, mem_type: str = "DRAM", device_id: int = 0
    ) -> None:
        tag = tag_of(mem_type, device_id)
        if tag != HOST:
            self._add_gpu(tag)
        self._regions.add(addr, length, tag)

    def _add_gpu(self, device: int) -> None:
        from services.common import cudart

        cudart.check_device(device)
        with self._lock:
            for other in self._gpus - {device}:  # both directions, so either side may drive
                for a, b in ((device, other), (other, device)):
                    if not cudart.enable_peer_access(a, b):
                        raise TransferError(
                            f"local backend: GPU {a} cannot reach GPU {b} peer-to-peer; the "
                            "same-node path copies between GPUs without staging"
                        )
            self._gpus.add(device)

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
        src_addrs, lengths, dsts, gpu, _ = self._plan(peer, src, dst_addrs)
        if len(lengths) == 0:
            return
        on_host = gpu == HOST
        for s, n, d in zip(src_addrs[on_host].tolist(), lengths[on_host].tolist(),
                           dsts[on_host].tolist(), strict=True):
            ctypes.memmove(d, s, n)
        if not on_host.all():
            self._copy_on_gpus(src_addrs[~on_host], lengths[~on_host], dsts[~on_host],
                               gpu[~on_host])

    def write_async(self, peer: str, src: list[tuple[int, int]],
                    dst_addrs: list[int]) -> QueuedCopy | None:
        """Queue a GPU-to-GPU write (see the module doc); None when it is not one — some range
        in host memory, or sources or destinations on more than one GPU: use `write`."""
        prepared = self.prepare_async(peer, src, dst_addrs)
        return None if prepared is None else prepared.issue()

    def prepare_async(self, peer: str, src: list[tuple[int, int]],
                      dst_addrs: list[int]) -> PreparedCopy | None:
        """`write_async` up to the CUDA calls that queue it: checked, planned, its events
        taken; None when it is not a GPU-to-GPU write."""
        src_addrs, lengths, dsts, src_gpu, dst_gpu = self._plan(peer, src, dst_addrs)
        if len(lengths) == 0 or (src_gpu == HOST).any() or (dst_gpu == HOST).any():
            return None
        devices = (np.unique(src_gpu), np.unique(dst_gpu))
        if len(devices[0]) != 1 or len(devices[1]) != 1:
            return None
        from services.common import cudart

        source, dest = int(devices[0][0]), int(devices[1][0])
        try:
            ready = self._take_event(source, dest)
        except cudart.CudaError as e:
            raise TransferError(f"local backend: GPU copy failed: {e}") from e
        runs = list(zip(dsts.tolist(), src_addrs.tolist(), lengths.tolist(), strict=True))
        return PreparedCopy(self, ready, runs)

    def _plan(self, peer: str, src: list[tuple[int, int]], dst_addrs: list[int]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Checked arrays: (sources, lengths, destinations, the GPU that drives each copy or
        HOST, each destination's GPU or HOST)."""
        src_addrs, lengths, dsts = batch_arrays(src, dst_addrs)
        if self._is_closed:
            raise TransferError(f"local backend: write to {peer} after close")
        if peer != PEER:
            raise TransferError(f"local backend: unknown peer {peer!r} (connect first)")
        if len(lengths) == 0 or not len(self._regions):
            host = np.full(len(lengths), HOST, np.int64)
            return src_addrs, lengths, dsts, host, host
        src_tags = self._regions.locate(src_addrs, lengths)
        dst_tags = self._regions.locate(dsts, lengths)
        for what, tags, addrs in (("source", src_tags, src_addrs),
                                  ("destination", dst_tags, dsts)):
            bad = np.flatnonzero(tags == OUTSIDE)
            if bad.size:
                i = int(bad[0])
                raise TransferError(
                    f"local backend: {what} [{int(addrs[i]):#x}, +{int(lengths[i])}) of "
                    f"descriptor {i} is outside every registered region"
                )
        # the GPU that drives each copy: the source's, else the destination's, else HOST
        return src_addrs, lengths, dsts, np.where(src_tags != HOST, src_tags, dst_tags), dst_tags

    def _copy_on_gpus(self, src_addrs: np.ndarray, lengths: np.ndarray, dsts: np.ndarray,
                      gpus: np.ndarray) -> None:
        """One cudaMemcpyAsync per descriptor on this thread's stream of the GPU that drives
        it; every stream used is synchronized before returning."""
        from services.common import cudart

        used: dict[int, Any] = {}
        try:
            for s, n, d, g in zip(src_addrs.tolist(), lengths.tolist(), dsts.tolist(),
                                  gpus.tolist(), strict=True):
                if g not in used:
                    used[g] = self._stream(g)  # also makes g this thread's current device
                cudart.copy_async(d, s, n, used[g])
        except cudart.CudaError as e:
            raise TransferError(f"local backend: GPU copy failed: {e}") from e
        finally:
            errors = []
            for stream in used.values():
                try:
                    cudart.stream_synchronize(stream)
                except cudart.CudaError as e:
                    errors.append(str(e))
            if errors:
                raise TransferError(f"local backend: GPU copy failed: {'; '.join(errors)}")

    def _stream(self, device: int) -> Any:
        """This thread's stream on `device` (made on first use, destroyed by `close`); the
        device becomes the thread's current one."""
        from services.common import cudart

        cudart.set_device(device)
        streams: dict[int, Any] | None = getattr(self._thread, "streams", None)
        if streams is None:
            streams = self._thread.streams = {}
        if device not in streams:
            streams[device] = cudart.stream_create(device)
            with self._lock:
                self._streams.append(streams[device])
        return streams[device]

    def _take_event(self, source: int, dest: int) -> _IpcEvent:
        with self._lock:
            free = self._free_events.setdefault((source, dest), [])
            if free:
                return free.pop(0)  # the longest idle: a late waiter least likely to see reuse
        from services.common import cudart

        event, handle = cudart.ipc_event_create(dest)
        ready = _IpcEvent(source, dest, event, handle)
        with self._lock:
            self._events.append(ready)  # destroyed by close, even if only half made
        ready.started = cudart.event_create(source, timing=True)
        ready.copied = cudart.event_create(source, timing=True)
        ready.order = cudart.event_create(source)
        return ready

    def _give_back(self, ready: _IpcEvent) -> None:
        with self._lock:
            if not self._is_closed:
                self._free_events.setdefault((ready.source, ready.dest), []).append(ready)

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        with self._lock:
            streams, self._streams = self._streams, []
            events = [e for ready in self._events
                      for e in (ready.event, ready.started, ready.copied, ready.order)
                      if e is not None]
            self._events, self._free_events = [], {}
        if streams or events:
            from services.common import cudart

            for stream in streams:
                cudart.stream_destroy(stream)
            for event in events:
                cudart.event_destroy(event)


@dataclass(slots=True)
class _IpcEvent:
    """One queued copy's events, reused together: the ready event (interprocess, on the
    destination GPU), and on the source GPU two timing events around the copies and the event
    the destination's stream waits on."""

    source: int
    dest: int
    event: Any
    handle: bytes  # the ready event's CUDA IPC handle
    started: Any = None  # recorded before the copies
    copied: Any = None  # recorded after them
    order: Any = None  # recorded after them too, for the destination GPU's stream


class PreparedCopy:
    """A GPU-to-GPU write planned by `LocalBackend.prepare_async`, not queued yet. `issue()`
    queues it on the calling thread's streams (see the module doc) — a few CUDA calls made
    without letting go of the GIL, so that kvd can issue it on the thread that saw the source
    pages become ready, at once — and returns its `QueuedCopy`;
    raises `TransferError`. `discard()` gives its events back unused. Call exactly one of
    them, once."""

    def __init__(self, backend: LocalBackend, ready: _IpcEvent,
                 runs: list[tuple[int, int, int]]) -> None:
        self._backend = backend
        self._ready = ready
        self._runs = runs  # (destination address, source address, bytes)

    def issue(self) -> QueuedCopy:
        from services.common import cudart

        backend, ready = self._backend, self._ready
        copying = backend._stream(ready.source)
        try:
            if ready.source == ready.dest:
                cudart.queue_copies(copying, self._runs, ready.started,
                                    [ready.copied, ready.event])
            else:
                cudart.queue_copies(copying, self._runs, ready.started,
                                    [ready.copied, ready.order])
                cudart.queue_wait_and_record(backend._stream(ready.dest), ready.order,
                                             ready.event)
        except cudart.CudaError as e:
            try:  # the caller frees the pages on this error: nothing may still be copying
                cudart.stream_synchronize(copying)
            except cudart.CudaError:
                pass
            raise TransferError(f"local backend: GPU copy failed: {e}") from e
        return QueuedCopy(backend, ready)

    def discard(self) -> None:
        self._backend._give_back(self._ready)


class QueuedCopy:
    """GPU copies queued by `LocalBackend.write_async` or `PreparedCopy.issue`. `ready_event`:
    the IPC handle of the event recorded after them. `wait(on_copied)`: block until they are
    done and return the seconds the copies took on the GPU; raises `TransferError`. Call it
    exactly once: it also returns the events to the backend's pool. `on_copied` (optional) is
    called on the waiting thread the moment the copies are done on the source GPU's stream,
    before the ready event (recorded on the destination GPU after a cross-GPU wait, ~0.1 ms
    later on 2xH100) completes."""

    def __init__(self, backend: LocalBackend, ready: _IpcEvent) -> None:
        self._backend = backend
        self._ready = ready
        self.ready_event = ready.handle

    def wait(self, on_copied: Callable[[], None] | None = None) -> float:
        from services.common import cudart

        ready = self._ready
        try:
            if on_copied is not None:
                cudart.event_synchronize(ready.copied)
                try:
                    on_copied()
                except Exception:  # noqa: BLE001 - the caller learns of the end anyway
                    logger.exception("on_copied failed")
            cudart.event_synchronize(ready.event)
            seconds = cudart.event_elapsed_seconds(ready.started, ready.copied)
        except cudart.CudaError as e:
            raise TransferError(f"local backend: GPU copy failed: {e}") from e
        self._backend._give_back(ready)
        return seconds
