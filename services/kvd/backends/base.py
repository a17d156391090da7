"""The transfer-backend interface: how kvd moves KV bytes into a peer kvd's pool.

Contract
--------
Who calls what. kvd creates exactly one backend per process with `create_backend(name, ...)`
at start-up, then `register`s each pool it owns once (more may follow later), saying where it
lives: host memory ("DRAM") or VRAM of a GPU (`device_id`, kvd's CUDA index); one backend may
hold DRAM and VRAM of several GPUs at once.
It sends `metadata()` to peer kvds during the bootstrap handshake and passes each blob it
receives from a peer to `connect()`, which returns the peer handle that `write` takes. When a
peer registered more memory it sends fresh metadata; `connect()` with it refreshes the peer.
The prefill side's transfer threads call `write` (push: the side that owns the KV writes it
into the pages the decode side allocated). `close()` is called once at shutdown.

Memory ownership. kvd owns every registered region: it allocates the memory, keeps it mapped
for the backend's whole life and frees it only after `close()`. A backend never allocates,
frees or unmaps pool memory; it only pins/registers it. Addresses are plain integers in the
calling process's address space (`dst_addrs` are in the peer's address space).

Descriptors. `write(peer, src, dst_addrs)` copies `src[i] = (local_addr, length)` to
`dst_addrs[i]` in the peer. Every source range must lie inside a region registered here and
every destination range inside a region the peer had registered when it produced the
metadata this side last connected with; all sources of one batch must be of one memory type,
and so must all destinations (a room moves from one pool to one pool). Callers should
coalesce adjacent pages into one descriptor: per-descriptor cost dominates small
descriptors (DESIGN.md, "KV memory layout").

Blocking and errors. `write` returns only when every byte of the batch has landed in the
peer's memory, or raises `TransferError` (naming the peer and the reason). After an error the
destination ranges hold undefined bytes, and after a timeout bytes of the abandoned write may
still land there later: the caller must not hand those pages to another room until the peer
is known dead or a later write to it succeeded. Bytes outside the ranges are never touched.
A backend that cannot start here (package, plugin, library or environment variable missing)
raises `BackendUnavailable` from its constructor, naming what is missing and how to install it.
An empty batch is a no-op; malformed input (mismatched list lengths, a length <= 0) raises
`ValueError`.

Thread safety. `write` may be called from several threads at once, to the same or different
peers. `register`, `metadata`, `connect` may run concurrently with writes. `close` must not
race with anything.

Optional capabilities (kvd looks for them by name). `prepare_write(peer, src, dst_addrs)`:
the checks and set-up of `write`, returning an object whose `issue()` posts it from any thread
and returns one whose `wait()` blocks like `write` and returns the seconds since posting
(`discard()` instead of `issue()` frees it) — kvd posts a room sent ahead from the thread that
sees its source pages ready. `notify(peer, message)`, `notifications()` and
`peer_name(metadata)`: small messages over the backend's own connection, sent after writes
have completed, read by the peer with the sender's name (the one `peer_name` reads from its
metadata) — kvd sends TransferDone that way (notifications.py). NIXL has all of them; the
local backend has `prepare_async` (queued GPU copies with a ready event) instead.
"""

from __future__ import annotations

from typing import Protocol

BACKEND_NAMES = ("nixl", "mooncake", "ascend", "local")


class TransferError(RuntimeError):
    """A transfer (or a connection to a peer) failed; the message says which peer and why."""


class BackendUnavailable(RuntimeError):
    """The backend cannot start here; the message names what is missing and how to get it."""


class TransferBackend(Protocol):
    name: str  # "nixl" | "mooncake" | "local"

    def register(self, addr: int, length: int, *, mem_type: str = "DRAM",
                 device_id: int = 0) -> None:
        """Register [addr, addr + length) once: kvd's pool memory, host ("DRAM") or GPU
        `device_id`'s ("VRAM")."""
        ...

    def metadata(self) -> bytes:
        """Opaque blob for a peer's `connect`; reflects every region registered so far."""
        ...

    def connect(self, peer_metadata: bytes) -> str:
        """Idempotent; returns the peer handle. Newer metadata of the same peer refreshes it."""
        ...

    def write(self, peer: str, src: list[tuple[int, int]], dst_addrs: list[int]) -> None:
        """Blocking: copy each local (addr, length) to the peer's dst address, all or raise."""
        ...

    def close(self) -> None:
        """Release the backend's resources (not the registered memory, which kvd owns)."""
        ...


def create_backend(
    name: str,
    *,
    hostname: str = "127.0.0.1",
    ib_device: str | None = None,
) -> TransferBackend:
    """Start the backend `name` (`--disaggregation-transfer-backend`).

    hostname: this node's address as a peer can reach it (Mooncake's `local_hostname`).
    ib_device: `--disaggregation-ib-device` (Mooncake: RDMA device; NIXL/UCX: `ucx_devices`).
    """
    if name == "nixl":
        from services.kvd.backends.nixl_backend import NixlBackend

        return NixlBackend(ib_device=ib_device)
    if name == "mooncake":
        from services.kvd.backends.mooncake_backend import MooncakeBackend

        return MooncakeBackend(hostname=hostname, ib_device=ib_device)
    if name == "ascend":
        from services.kvd.backends.ascend_backend import open_ascend_backend

        return open_ascend_backend()
    if name == "local":
        from services.kvd.backends.local_backend import LocalBackend

        return LocalBackend()
    raise ValueError(
        f"--disaggregation-transfer-backend {name!r} is unknown; choose one of {BACKEND_NAMES}"
    )
