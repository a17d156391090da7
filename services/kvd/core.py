"""kvd's rooms: the receive side waits for a room's KV, the send side pushes it.

`KvdCore` is one kvd's state and its two flows, which kvd's gRPC services call:
- receiving.py (`Receiver`, the decode node): ExpectKv, TransferDone, heartbeats, ReleaseRoom;
- sending.py (`Sender`, the prefill node): Handshake, Bootstrap, AwaitBootstrap, SendKv /
  SendKvAhead, CancelRoom.
rooms.py holds what both share (RoomError, the counters). All on kvd's asyncio loop; blocking
writes run on the transfer threads. Whatever happens (success, error, timeout, cancellation),
each flow unpins its pages on the way out, so every pool's accounting returns to its baseline.
"""

from __future__ import annotations

from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd.backends.base import TransferBackend
from services.kvd.config import TransferSettings
from services.kvd.metrics import KvdMetrics, PoolSnapshot, Snapshot
from services.kvd.peers import PeerDirectory
from services.kvd.pools import PoolRegistry
from services.kvd.receiving import Receiver
from services.kvd.rooms import Counters, RoomError
from services.kvd.sending import Sender

__all__ = ["KvdCore", "RoomError"]


class KvdCore:
    def __init__(self, kvd_id: str, peer_address: str, backend: TransferBackend,
                 local_backend: TransferBackend, settings: TransferSettings) -> None:
        self.kvd_id = kvd_id
        self.peer_address = peer_address
        self.backend = backend
        self.local_backend = local_backend
        self.settings = settings
        self.pools = PoolRegistry(kvd_id, [backend, local_backend])
        self.metrics = KvdMetrics()
        self.peers = PeerDirectory(kvd_id, peer_address, backend.name, backend.metadata,
                                   self.metrics)
        self.counters = Counters()
        shared = (kvd_id, backend, local_backend, settings, self.pools, self.metrics,
                  self.peers, self.counters)
        self.receiver = Receiver(*shared)
        self.sender = Sender(*shared, receiver=self.receiver)
        self.listener = self.receiver.listener  # NIXL notifications (None without)
        self.queues = self.sender.queues
        self.source_events = self.sender.source_events

    @property
    def num_open_rooms(self) -> int:
        return (self.receiver.num_rooms + self.counters.open_sends
                + self.counters.awaiting_bootstrap)

    def snapshot(self) -> Snapshot:
        """Pools and open rooms for the metrics' gauges (on the event loop)."""
        return ([PoolSnapshot(p.pool_id, p.layout.num_pages, p.num_pinned)
                 for p in self.pools.pools()], self.num_open_rooms)

    # --- decode side (receiving.py) --------------------------------------------------------

    async def expect_kv(self, req: kvd_pb2.ExpectKvRequest) -> kvd_pb2.ExpectKvResponse:
        return await self.receiver.expect_kv(req)

    def on_transfer_done(self, req: kvd_pb2.TransferDoneRequest) -> None:
        self.receiver.on_transfer_done(req)

    async def heartbeat_loop(self) -> None:
        await self.receiver.heartbeat_loop()

    # --- prefill side (sending.py) ---------------------------------------------------------

    def on_handshake(self, req: kvd_pb2.HandshakeRequest) -> None:
        self.sender.on_handshake(req)

    def on_bootstrap(self, req: kvd_pb2.BootstrapRequest) -> None:
        self.sender.on_bootstrap(req)

    async def on_cancel_room(self, req: kvd_pb2.CancelRoomRequest) -> None:
        await self.sender.on_cancel_room(req)

    async def await_bootstrap(self, req: kvd_pb2.AwaitBootstrapRequest
                              ) -> kvd_pb2.AwaitBootstrapResponse:
        return await self.sender.await_bootstrap(req)

    async def send_kv(self, req: kvd_pb2.SendKvRequest, aux=None) -> kvd_pb2.SendKvResponse:
        """`aux`: see `Sender.send_kv` (SendKvAhead's first token, later)."""
        return await self.sender.send_kv(req, aux)

    # --- both ------------------------------------------------------------------------------

    async def release_room(self, name: str) -> bool:
        """The worker gives up on a room. Returns once no write into its pages can still land
        (at most a waiting timeout): only then may the worker reuse them. False if the room
        is unknown here."""
        expected = await self.receiver.release(name)
        return self.sender.release(name) or expected
