"""NIXL transfer backend: one NIXL agent per kvd process, UCX by default.

`SGLANG_DISAGGREGATION_NIXL_BACKEND` picks the NIXL plugin (UCX, LIBFABRIC, ...); a plugin
that is unknown or fails to load is a start-up `BackendUnavailable` that lists the plugins this
NIXL build ships. The agent runs with NIXL's reader/writer thread sync, so writes from several
threads proceed concurrently while `register`/`connect` take the agent's writer lock. Its
progress thread (needed: it serves peers' writes into this process) pauses PROGRESS_DELAY_US
between idle polls instead of spinning a core as nixl_agent's default does.

Memory may be host memory (DRAM) or VRAM of any GPU, region by region (one kvd holds pools on
several GPUs); a write's descriptors carry each range's device id, and one batch moves one
memory type to one memory type. Metadata is a header (magic, agent name, the registered
regions with their memory type and device) followed by NIXL's agent metadata; it names every
region registered so far, so a peer that registered more memory must send fresh metadata and
the writer must `connect()` again before writing there (NIXL checks remote ranges against the
metadata it holds: `TransferError`).
`connect()` with this backend's own metadata gives a loopback peer (NIXL copies locally).

A write is made in two steps kvd may run on different threads: `prepare_write` (checks,
descriptor lists, NIXL's transfer handle: ~0.23 ms of a 512 MiB VRAM write's 1.65 ms on
2xH100, and most of a small write's cost) and `PreparedWrite.issue()`, which posts it;
`PostedWrite.wait()` polls it to the end. `notify` / `notifications` carry small messages over
the same connection (kvd's TransferDone, services/kvd/notifications.py); `peer_name` reads the
agent name a peer's metadata carries, which is the sender `notifications()` reports.

UCX facts (DESIGN.md): a process that created the UCX backend segfaults at exit unless
`UCX_MODULES=^ib` is set or it ends with `os._exit`; `UCX_TLS=tcp` forces the network path.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import uuid

import numpy as np

from services.common.timer_slack import use_fine_timer_slack
from services.kvd.backends.base import BackendUnavailable, TransferError
from services.kvd.backends.shared import (
    HOST,
    OUTSIDE,
    RegionTable,
    batch_arrays,
    check_ib_devices,
    tag_of,
)

logger = logging.getLogger(__name__)

PLUGIN_ENV = "SGLANG_DISAGGREGATION_NIXL_BACKEND"
DEFAULT_PLUGIN = "UCX"
_HEADER = struct.Struct("<4sHI")  # magic, len(name), number of regions
_REGION = struct.Struct("<QQq")  # addr, length, tag (shared.HOST or the GPU's device id)
_MAGIC = b"TNX2"
# Polls of a write's state pause 1/64 of the time it has run (10 us .. 1 ms), with fine timer
# slack: a 1.4 ms VRAM write is seen done ~20 us late (doubling pauses saw it up to 0.9 ms
# late, and 1/16 with Linux's default 50 us of slack ~0.1 ms).
_POLL_FRACTION = 1 / 64
_MIN_POLL_S, _MAX_POLL_S = 10e-6, 1e-3
# The progress thread's pause between idle polls. nixl_agent hard-codes 0, and the thread then
# spins a core even when no transfer is running (measured: 60% of a core on an idle kvd, and
# writes over UCX_TLS=tcp ~3x slower on 2 cores); 100 us costs ~1% of a core and no bandwidth.
PROGRESS_DELAY_US = 100


class NixlBackend:
    name = "nixl"

    def __init__(
        self,
        *,
        plugin: str | None = None,
        ib_device: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        plugin = plugin or os.environ.get(PLUGIN_ENV) or DEFAULT_PLUGIN
        if ib_device:
            check_ib_devices(ib_device)
        try:
            from nixl._api import (  # type: ignore[import-untyped]
                nixl_agent,
                nixl_agent_config,
                nixl_thread_sync_t,
            )
        except ImportError as e:
            raise BackendUnavailable(
                f"transfer backend 'nixl' needs the NIXL Python package: pip install nixl==1.5.1 "
                f"(CUDA 13 machines: nixl-cu13) ({e})"
            ) from e
        self.agent_name = f"tandem-kvd-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # guards the dicts below, not NIXL (which locks itself)
        self._metadata_by_peer: dict[str, bytes] = {}  # the latest metadata loaded per peer
        self._peer_regions: dict[str, RegionTable] = {}  # peer -> its registered regions
        self._registrations: list[object] = []
        self._regions = RegionTable()  # the same ranges with their memory type and device
        self._metadata: bytes | None = None  # memo of metadata(); a registration clears it
        self._generation = 0  # registrations so far (a memo made across one is not kept)
        self._is_closed = False
        sync_mode = getattr(
            nixl_thread_sync_t, "NIXL_THREAD_SYNC_RW", nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
        )
        try:
            agent = nixl_agent(self.agent_name, nixl_agent_config(backends=[], sync_mode=sync_mode))
        except RuntimeError as e:  # "No plugins available for NIXL"
            raise BackendUnavailable(f"NIXL found no plugins at all: {e}") from e
        _throttle_progress_thread(agent, sync_mode.value)
        available = list(agent.get_plugin_list())
        if plugin not in available:
            raise BackendUnavailable(
                f"NIXL plugin {plugin!r} (from {PLUGIN_ENV}) is not available; "
                f"this NIXL ships: {', '.join(available)}"
            )
        init_params: dict[str, str] = {}
        if ib_device:
            if plugin != "UCX":
                raise ValueError(
                    f"--disaggregation-ib-device is applied through UCX; NIXL plugin {plugin!r} "
                    "takes its devices from its own configuration"
                )
            init_params["ucx_devices"] = ib_device
        try:
            agent.create_backend(plugin, init_params)
        except Exception as e:  # the bindings raise their own nixl*Error types
            raise BackendUnavailable(
                f"NIXL plugin {plugin!r} (from {PLUGIN_ENV}) failed to start: "
                f"{type(e).__name__}: {e}; its system libraries may be missing. "
                f"This NIXL ships: {', '.join(available)}"
            ) from e
        self._mem_types = set(agent.get_backend_mem_types(plugin))  # e.g. {"DRAM_SEG", ...}
        if "DRAM_SEG" not in self._mem_types:
            raise BackendUnavailable(f"NIXL plugin {plugin!r} cannot register DRAM memory")
        self._agent = agent
        self.plugin = plugin

    def register(
        self, addr: int, length: int, *, mem_type: str = "DRAM", device_id: int = 0
    ) -> None:
        if addr <= 0 or length <= 0:
            raise ValueError(f"cannot register addr={addr:#x} length={length}")
        tag = tag_of(mem_type, device_id)
        if f"{mem_type}_SEG" not in self._mem_types:
            raise TransferError(f"nixl: plugin {self.plugin!r} cannot register {mem_type} memory")
        try:
            descs = self._agent.register_memory(
                [(addr, length, device_id if tag != HOST else 0, "")], mem_type
            )
        except Exception as e:
            raise TransferError(
                f"nixl: registering {mem_type} [{addr:#x}, +{length}) of device {device_id} "
                f"failed: {type(e).__name__}: {e}"
            ) from e
        self._regions.add(addr, length, tag)
        with self._lock:
            self._registrations.append(descs)
            self._metadata = None
            self._generation += 1

    def metadata(self) -> bytes:
        """Memoized: kvd compares it on every room's peer look-up (NIXL serializes every
        registration each time it is asked); a registration clears the memo."""
        with self._lock:
            if self._metadata is not None:
                return self._metadata
            generation = self._generation
        name = self.agent_name.encode()
        regions = self._regions.regions()
        packed = b"".join(_REGION.pack(*region) for region in regions)
        header = _HEADER.pack(_MAGIC, len(name), len(regions))
        metadata = header + name + packed + self._agent.get_agent_metadata()
        with self._lock:
            if self._generation == generation:
                self._metadata = metadata
        return metadata

    def connect(self, peer_metadata: bytes) -> str:
        peer = peer_name(peer_metadata)  # checks the header
        _, name_len, num_regions = _HEADER.unpack_from(peer_metadata)
        body = _HEADER.size + name_len + num_regions * _REGION.size
        if len(peer_metadata) <= body:
            raise TransferError(f"nixl: metadata of peer {peer} is truncated")
        peer_regions = RegionTable()
        for i in range(num_regions):
            peer_regions.add(*_REGION.unpack_from(peer_metadata, _HEADER.size + name_len
                                                  + i * _REGION.size))
        with self._lock:
            if self._metadata_by_peer.get(peer) == peer_metadata:
                return peer  # nothing new: connecting again is free
        if peer != self.agent_name:  # NIXL refuses to load its own metadata: loopback needs none
            try:
                # loading newer metadata of a known agent replaces what NIXL held for it
                loaded = self._agent.add_remote_agent(peer_metadata[body:])
            except Exception as e:
                raise TransferError(
                    f"nixl: cannot load metadata of peer {peer}: {type(e).__name__}: {e}"
                ) from e
            loaded = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            if loaded != peer:
                raise TransferError(f"nixl: metadata of peer {peer} describes agent {loaded}")
        with self._lock:
            self._metadata_by_peer[peer] = peer_metadata
            self._peer_regions[peer] = peer_regions
        return peer

    def write(self, peer: str, src: list[tuple[int, int]], dst_addrs: list[int]) -> None:
        prepared = self.prepare_write(peer, src, dst_addrs)
        if prepared is not None:
            prepared.issue().wait()

    def prepare_write(self, peer: str, src: list[tuple[int, int]],
                      dst_addrs: list[int]) -> PreparedWrite | None:
        """`write` up to posting it: checked and made into a NIXL transfer (descriptor lists
        and NIXL's handle: most of a small write's cost), so that kvd can post it from the
        thread that sees the source pages become ready. None for an empty batch."""
        src_addrs, lengths, dsts = batch_arrays(src, dst_addrs)
        if len(lengths) == 0:
            return None
        with self._lock:
            peer_regions = self._peer_regions.get(peer)
            is_closed = self._is_closed
        if is_closed:
            raise TransferError(f"nixl: write to {peer} after close")
        if peer_regions is None:
            raise TransferError(f"nixl: unknown peer {peer!r} (connect with its metadata first)")
        src_tags = self._regions.locate(src_addrs, lengths)
        dst_tags = peer_regions.locate(dsts, lengths)
        for what, tags, addrs in (("source", src_tags, src_addrs), ("destination", dst_tags, dsts)):
            bad = np.flatnonzero(tags == OUTSIDE)
            if bad.size:
                i = int(bad[0])
                where = "here" if what == "source" else f"by {peer} (as of its last metadata)"
                raise TransferError(
                    f"nixl: write to {peer}: {what} [{int(addrs[i]):#x}, +{int(lengths[i])}) of "
                    f"descriptor {i} is outside memory registered {where}"
                )
        local_type, remote_type = _mem_type(src_tags, "source"), _mem_type(dst_tags, "destination")
        # [num_descs, 3] = (addr, length, device id); host memory's device id is 0
        local = np.stack([src_addrs, lengths, np.maximum(src_tags, 0).astype(np.uint64)], axis=1)
        remote = np.stack([dsts, lengths, np.maximum(dst_tags, 0).astype(np.uint64)], axis=1)
        try:
            handle = self._agent.initialize_xfer(
                "WRITE",
                self._agent.get_xfer_descs(local, local_type),
                self._agent.get_xfer_descs(remote, remote_type),
                peer,
            )
        except Exception as e:
            raise TransferError(
                f"nixl: cannot create a write of {len(lengths)} descriptors to {peer}: "
                f"{type(e).__name__}: {e} (every destination must be inside memory the peer "
                "had registered when it made the metadata this side last connected with)"
            ) from e
        device = int(src_tags[0]) if local_type == "VRAM" else None
        return PreparedWrite(self, handle, f"nixl: write of {len(lengths)} descriptors to {peer}",
                             device)

    def _release(self, handle: object, what: str) -> None:
        try:
            self._agent.release_xfer_handle(handle)
        except Exception:  # NIXL keeps a handle it cannot cancel and frees it at the end
            logger.warning("%s: could not release the transfer", what, exc_info=True)

    def notify(self, peer: str, message: bytes) -> None:
        """Send `message` to the peer's agent, where its `notifications()` returns it; the
        peer need not have connected to this side. Send it after the writes it reports have
        completed (NIXL does not order it after writes still in flight); it is lost if the
        connection is."""
        try:
            self._agent.send_notif(peer, message)
        except Exception as e:
            raise TransferError(f"nixl: notification to {peer} failed: "
                                f"{type(e).__name__}: {e}") from e

    @staticmethod
    def peer_name(metadata: bytes) -> str:
        """The agent a peer's metadata names (see `peer_name`)."""
        return peer_name(metadata)

    def notifications(self) -> list[tuple[str, bytes]]:
        """(sending agent, message) of every notification received since the last call."""
        return [(agent, message) for agent, messages in self._agent.get_new_notifs().items()
                for message in messages]

    def close(self) -> None:
        with self._lock:
            if self._is_closed:
                return
            self._is_closed = True
            peers, registrations = list(self._peer_regions), self._registrations
            self._registrations = []
        for peer in peers:
            if peer == self.agent_name:
                continue
            try:
                self._agent.remove_remote_agent(peer)
            except Exception:
                logger.warning("nixl: could not forget peer %s", peer, exc_info=True)
        for descs in registrations:
            try:
                self._agent.deregister_memory(descs)
            except Exception:
                logger.warning("nixl: could not deregister memory", exc_info=True)


class PreparedWrite:
    """A write made by `NixlBackend.prepare_write`, not posted yet. `issue()` posts it from the
    calling thread (VRAM sources: that thread's current device becomes the source's, which
    UCX's CUDA transports copy with) and returns its `PostedWrite`; raises `TransferError`.
    `discard()` frees it unposted. Call exactly one of them, once."""

    def __init__(self, backend: NixlBackend, handle: object, what: str,
                 device: int | None) -> None:
        self._backend = backend
        self._handle = handle
        self._what = what
        self._device = device

    def issue(self) -> PostedWrite:
        backend, handle = self._backend, self._handle
        try:
            if self._device is not None:
                from services.common import cudart

                cudart.set_device(self._device)
            started = time.perf_counter()
            state = backend._agent.transfer(handle)
        except Exception as e:  # e.g. nixlRemoteDisconnectError when the peer died
            backend._release(handle, self._what)
            raise TransferError(f"{self._what} failed: {type(e).__name__}: {e}") from e
        if state == "ERR":
            backend._release(handle, self._what)
            raise TransferError(f"{self._what} failed ({state}); the peer may have exited or "
                                "the connection dropped")
        return PostedWrite(backend, handle, self._what, started, state)

    def discard(self) -> None:
        self._backend._release(self._handle, self._what)


class PostedWrite:
    """A posted NIXL write. `wait()` blocks until it has landed in the peer's memory and
    returns the seconds since it was posted, or raises `TransferError` (it failed, or the
    backend's timeout passed: its bytes may still land later). Call it exactly once, from
    any thread: it polls the write's state, `_POLL_FRACTION` of the time it has run apart,
    and frees the transfer."""

    ready_event = b""  # nothing another process could wait on: kvd reports the landing itself

    def __init__(self, backend: NixlBackend, handle: object, what: str, started: float,
                 state: str) -> None:
        self._backend = backend
        self._handle = handle
        self._what = what
        self._started = started
        self._state = state

    def wait(self) -> float:
        backend, handle, what = self._backend, self._handle, self._what
        timeout = backend._timeout_s
        use_fine_timer_slack()
        try:
            state = self._state
            while state == "PROC":
                elapsed = time.perf_counter() - self._started
                if elapsed > timeout:
                    raise TransferError(f"{what} not done after {timeout:.1f}s")
                time.sleep(min(max(elapsed * _POLL_FRACTION, _MIN_POLL_S), _MAX_POLL_S))
                state = backend._agent.check_xfer_state(handle)
            seconds = time.perf_counter() - self._started
        except TransferError:
            raise
        except Exception as e:  # e.g. nixlRemoteDisconnectError when the peer died
            raise TransferError(f"{what} failed: {type(e).__name__}: {e}") from e
        finally:
            backend._release(handle, what)
        if state != "DONE":
            raise TransferError(
                f"{what} failed ({state}); the peer may have exited or the connection dropped"
            )
        return seconds


def peer_name(metadata: bytes) -> str:
    """The agent name in a Tandem nixl backend's `metadata()`: the peer handle `connect` would
    return for it, and the sender `notifications()` names for its notifications."""
    if len(metadata) <= _HEADER.size or metadata[:4] != _MAGIC:
        raise TransferError("nixl: peer metadata is not from a Tandem nixl backend")
    _, name_len, _ = _HEADER.unpack_from(metadata)
    return metadata[_HEADER.size : _HEADER.size + name_len].decode(errors="replace")


def _mem_type(tags: np.ndarray, what: str) -> str:
    """The one NIXL memory type of a batch side (tags as shared.RegionTable's)."""
    is_host = tags == HOST
    if is_host.all():
        return "DRAM"
    if not is_host.any():
        return "VRAM"
    raise ValueError(f"nixl: a write's {what}s mix host memory and VRAM; send one pool per batch")


def _throttle_progress_thread(agent: object, sync_mode: int) -> None:
    """Rebuild the still backend-less C++ agent with PROGRESS_DELAY_US: the Python API exposes
    no setting for it (nixl 1.5.1). A passive target needs the thread (a peer's writes over TCP
    are progressed by it), so it stays on, only less eager."""
    try:
        from nixl import _bindings  # type: ignore[import-untyped]

        config = _bindings.nixlAgentConfig()
        config.useProgThread = True
        config.useListenThread = False
        config.syncMode = sync_mode
        config.pthrDelay = PROGRESS_DELAY_US
        config.captureTelemetry = False
        agent.agent = _bindings.nixlAgent(agent.name, config)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, TypeError):
        logger.warning("nixl: cannot set the progress thread's delay; it will spin a core")
