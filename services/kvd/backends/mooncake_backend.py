"""Mooncake transfer backend: a Mooncake TransferEngine inside kvd, P2P handshake, no etcd.

Transport: "tcp", or "rdma" on `--disaggregation-ib-device` (which must exist: Mooncake falls
back to TCP silently when it finds no HCA, so this backend checks first). The metadata is the
session id "host:rpc_port"; Mooncake connects lazily on the first write, so `hostname` must be
an address the peer can reach (never 0.0.0.0).

Per-peer limit. Over TCP Mooncake rejects a peer's transfers beyond
`MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER` (default 1024) queued at once, and after such a
rejection that peer may stay broken. So `write` splits a batch into chunks of at most that many
descriptors, and a per-peer credit counter keeps the descriptors in flight to one peer, summed
over all writing threads, within the limit.

Checks. Mooncake's TCP server refuses a destination outside the peer's registered memory
(`TransferError` here), but it reads any local source address it is given; this backend
therefore checks sources against its own registrations before posting. Mooncake's own
timeouts bound a write to a dead peer (`MC_TRANSFER_TIMEOUT`); `timeout_s` here bounds only
the wait for per-peer credits.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading

from services.kvd.backends.base import BackendUnavailable, TransferError
from services.kvd.backends.shared import (
    HOST,
    RegionTable,
    batch_arrays,
    check_ib_devices,
    tag_of,
)

logger = logging.getLogger(__name__)

PER_PEER_ENV = "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER"
DEFAULT_PER_PEER = 1024
PIP_HINT = (
    "pip install mooncake-transfer-engine-non-cuda==0.3.13.post1 "
    "(CUDA 13 machines: mooncake-transfer-engine-cuda13)"
)
APT_HINT = "apt-get install -y libibverbs1 ibverbs-providers"


def missing_dependency() -> str | None:
    """What Mooncake needs and this machine lacks, with the install command; None if nothing."""
    if importlib.util.find_spec("mooncake") is None:
        return f"the Python package mooncake-transfer-engine is not installed: {PIP_HINT}"
    try:
        ctypes.CDLL("libibverbs.so.1")
    except OSError:
        return f"Mooncake's engine needs libibverbs.so.1 (Debian): {APT_HINT}"
    return None


def per_peer_limit() -> int:
    raw = os.environ.get(PER_PEER_ENV, "")
    try:
        limit = int(raw) if raw else DEFAULT_PER_PEER
    except ValueError as e:
        raise ValueError(f"{PER_PEER_ENV}={raw!r} is not an integer") from e
    if limit < 1:
        raise ValueError(f"{PER_PEER_ENV} must be >= 1, not {limit}")
    return limit


class _Credits:
    """A counting semaphore that takes n units at once: descriptors in flight to one peer."""

    def __init__(self, capacity: int) -> None:
        self._cond = threading.Condition()
        self._free = capacity

    def acquire(self, n: int, timeout_s: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free >= n, timeout_s):
                return False
            self._free -= n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()


class MooncakeBackend:
    name = "mooncake"

    def __init__(
        self, *, hostname: str = "127.0.0.1", ib_device: str | None = None, timeout_s: float = 30.0
    ) -> None:
        if hostname in ("", "0.0.0.0", "::"):
            raise ValueError(
                f"mooncake hostname {hostname!r} is not an address a peer can reach; "
                "pass this node's IP (--host)"
            )
        if ib_device:
            check_ib_devices(ib_device)
        missing = missing_dependency()
        if missing:
            raise BackendUnavailable(f"transfer backend 'mooncake' cannot start: {missing}")
        try:
            from mooncake.engine import TransferEngine  # type: ignore[import-untyped]
        except ImportError as e:
            raise BackendUnavailable(
                f"transfer backend 'mooncake' cannot load its engine ({e}); {PIP_HINT}; {APT_HINT}"
            ) from e
        self._max_per_batch = per_peer_limit()
        self._timeout_s = timeout_s
        protocol = "rdma" if ib_device else "tcp"
        engine = TransferEngine()
        rc = engine.initialize(hostname, "P2PHANDSHAKE", protocol, ib_device or "")
        if rc != 0:
            raise BackendUnavailable(
                f"Mooncake TransferEngine failed to start (rc={rc}, protocol={protocol}, "
                f"hostname={hostname}, device={ib_device or '-'})"
            )
        self._engine = engine
        self.session_id = f"{hostname}:{engine.get_rpc_port()}"
        self._regions = RegionTable()
        self._registered: list[int] = []
        self._lock = threading.Lock()
        self._credits: dict[str, _Credits] = {}
        self._is_closed = False

    def register(
        self, addr: int, length: int, *, mem_type: str = "DRAM", device_id: int = 0
    ) -> None:
        """VRAM needs the CUDA build of Mooncake (mooncake-transfer-engine-cuda13), which
        finds the GPU of a device pointer itself."""
        if addr <= 0 or length <= 0:
            raise ValueError(f"cannot register addr={addr:#x} length={length}")
        tag = tag_of(mem_type, device_id)
        rc = self._engine.register_memory(addr, length)
        if rc != 0:
            raise TransferError(
                f"mooncake: registering {mem_type} [{addr:#x}, +{length}) of device {device_id} "
                f"failed (rc={rc})" + ("; VRAM needs the CUDA build of Mooncake" if tag != HOST
                                       else "")
            )
        self._regions.add(addr, length, tag)
        with self._lock:
            self._registered.append(addr)

    def metadata(self) -> bytes:
        return self.session_id.encode()

    def connect(self, peer_metadata: bytes) -> str:
        try:
            session = peer_metadata.decode("ascii")
            host, port = session.rsplit(":", 1)
            is_valid = bool(host) and 0 < int(port) < 65536
        except (UnicodeDecodeError, ValueError):
            is_valid = False
        if not is_valid:
            raise TransferError(
                f"mooncake: peer metadata {peer_metadata[:40]!r} is not a 'host:port' session id"
            )
        with self._lock:
            self._credits.setdefault(session, _Credits(self._max_per_batch))
        return session

    def write(self, peer: str, src: list[tuple[int, int]], dst_addrs: list[int]) -> None:
        src_addrs, lengths, dsts = batch_arrays(src, dst_addrs)
        if len(lengths) == 0:
            return
        with self._lock:
            credits = self._credits.get(peer)
            is_closed = self._is_closed
        if is_closed:
            raise TransferError(f"mooncake: write to {peer} after close")
        if credits is None:
            raise TransferError(
                f"mooncake: unknown peer {peer!r} (connect with its metadata first)"
            )
        bad = self._regions.first_outside(src_addrs, lengths)
        if bad is not None:
            raise TransferError(
                f"mooncake: write to {peer}: source [{int(src_addrs[bad]):#x}, "
                f"+{int(lengths[bad])}) of descriptor {bad} is outside memory registered here"
            )
        gpu = int(self._regions.locate(src_addrs[:1], lengths[:1])[0])
        if gpu != HOST:  # CUDA copies in the calling thread need a current context
            from services.common import cudart

            cudart.set_device(gpu)
        srcs, lens, dst_list = src_addrs.tolist(), lengths.tolist(), dsts.tolist()
        step = self._max_per_batch
        for start in range(0, len(srcs), step):
            end = min(start + step, len(srcs))
            if not credits.acquire(end - start, self._timeout_s):
                raise TransferError(
                    f"mooncake: write to {peer}: more than {step} descriptors in flight to it "
                    f"for {self._timeout_s:.1f}s ({PER_PEER_ENV})"
                )
            try:
                rc = self._engine.batch_transfer_sync_write(
                    peer, srcs[start:end], dst_list[start:end], lens[start:end]
                )
            finally:
                credits.release(end - start)
            if rc != 0:
                raise TransferError(
                    f"mooncake: write of descriptors [{start}, {end}) of {len(srcs)} to {peer} "
                    f"failed (rc={rc}): peer unreachable, or a destination outside its "
                    "registered memory"
                )

    def close(self) -> None:
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            registered, self._registered = self._registered, []
        for addr in registered:
            if self._engine.unregister_memory(addr) != 0:
                logger.warning("mooncake: could not unregister %#x", addr)
