"""What kvd's two room flows share (receiving.py, the decode side; sending.py, the prefill
side): the error a room fails with, the node's counters, and `RoomFlow`, the state both
flows read (one kvd process: the same objects in both)."""

from __future__ import annotations

from dataclasses import dataclass

from services.kvd.backends.base import TransferBackend, TransferError
from services.kvd.config import TransferSettings
from services.kvd.metrics import KvdMetrics
from services.kvd.peers import PeerDirectory
from services.kvd.pools import Pool, PoolRegistry


class RoomError(Exception):
    """A room's flow failed; `code` is the gRPC status name to answer with, `reason` the
    metrics' stable word for the cause (default: the code in lower case)."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or code.lower()


@dataclass(slots=True)
class Counters:
    rooms_completed: int = 0
    rooms_failed: int = 0
    bytes_sent: int = 0
    open_sends: int = 0
    awaiting_bootstrap: int = 0  # prefill requests waiting for their destination


class RoomFlow:
    """The node's state a room flow works with."""

    def __init__(self, kvd_id: str, backend: TransferBackend, local_backend: TransferBackend,
                 settings: TransferSettings, pools: PoolRegistry, metrics: KvdMetrics,
                 peers: PeerDirectory, counters: Counters) -> None:
        self.kvd_id = kvd_id
        self.backend = backend  # to other kvds
        self.local_backend = local_backend  # between pools of this kvd
        self.settings = settings
        self.pools = pools
        self.metrics = metrics
        self.peers = peers
        self.counters = counters

    def _pool(self, pool_id: str) -> Pool:
        try:
            return self.pools.get(pool_id)
        except KeyError as e:
            raise RoomError("NOT_FOUND", str(e.args[0])) from None


def agent_of(backend: TransferBackend, metadata: bytes) -> str | None:
    """The backend peer that metadata from a handshake names (None if it names none)."""
    try:
        return backend.peer_name(metadata)  # type: ignore[attr-defined]
    except (AttributeError, TransferError):
        return None


def backend_error(room: str, e: TransferError) -> RoomError:
    """A transfer backend's failure, as the room's."""
    return RoomError("UNAVAILABLE", f"room {room!r}: {e}", "backend_error")
