"""Connections to other kvds: handshake, bootstrap and completion messages, heartbeats.

Contract: `PeerDirectory.get(address)` returns the `Peer` for a kvd's peer address, doing the
handshake on first use (both sides learn each other's id and backend metadata; the callee
connects its backend to the caller, so it can write into the caller's pools), and again when
this kvd's metadata changed since (a pool attached later: the peer could not write into it
otherwise) or when `fresh` says the peer forgot us (it restarted). A `Peer` whose
heartbeats fail `max_failure` times in a row is marked dead; `on_dead` callbacks fail the rooms
waiting on it. All methods run on kvd's asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from services.common.grpc_errors import RECONNECT_OPTIONS
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.kvd.metrics import KvdMetrics

logger = logging.getLogger(__name__)

RPC_TIMEOUT = 10.0
# A channel of its own per peer: by default gRPC shares a subchannel between channels to the
# same address, so a "fresh" channel to a kvd restarted at its old address inherited the dead
# one's reconnect backoff and failed at once ("Connection refused") for up to that backoff.
# The backoff is capped too, for the peer's own channel while it is down.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), *RECONNECT_OPTIONS]


class PeerUnavailable(RuntimeError):
    """A peer kvd cannot be reached or refused the handshake."""


class Peer:
    def __init__(self, address: str, channel: grpc.aio.Channel) -> None:
        self.address = address
        self.channel = channel
        self.stub = kvd_pb2_grpc.KvdPeerServiceStub(channel)
        self.kvd_id: str | None = None
        self.sent_metadata = b""  # this kvd's backend metadata as of the last handshake
        self.backend_metadata = b""  # the peer's, from its handshake reply
        self.failures = 0
        self.is_dead = False


class PeerDirectory:
    def __init__(self, self_id: str, self_address: str, backend_name: str,
                 metadata: Callable[[], bytes], metrics: KvdMetrics | None = None) -> None:
        self._self_id = self_id
        self._metrics = metrics or KvdMetrics()
        self._self_address = self_address
        self._backend_name = backend_name
        self._metadata = metadata
        self._peers: dict[str, Peer] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, address: str, fresh: bool = False) -> Peer:
        lock = self._locks.setdefault(address, asyncio.Lock())
        if not fresh and not lock.locked():  # the hot path: no handshake, no lock, no await
            old = self._peers.get(address)
            if old is not None and not old.is_dead and old.sent_metadata == self._metadata():
                return old
        async with lock:
            old = self._peers.get(address)
            metadata = self._metadata()
            if old is not None and not old.is_dead and not fresh and old.sent_metadata == metadata:
                return old
            reuse = old.channel if old is not None and not old.is_dead else None
            peer = Peer(address, reuse if reuse is not None
                        else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
            try:
                reply = await peer.stub.Handshake(kvd_pb2.HandshakeRequest(
                    kvd_id=self._self_id, backend=self._backend_name,
                    backend_metadata=metadata, peer_address=self._self_address,
                ), timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                self._metrics.handshake_failures.labels(e.code().name.lower()).inc()
                if reuse is None:
                    await peer.channel.close()
                raise PeerUnavailable(
                    f"kvd at {address}: handshake failed: {e.code().name}: {e.details()}"
                ) from None
            peer.kvd_id = reply.kvd_id
            peer.sent_metadata = metadata
            peer.backend_metadata = reply.backend_metadata
            if old is not None and old.kvd_id != peer.kvd_id:
                old.is_dead = True  # it restarted: rooms bound to the old one fail at once
            self._peers[address] = peer
            if old is not None and old.channel is not peer.channel:
                await old.channel.close()  # or it keeps reconnecting; its calls fail now
            return peer

    async def heartbeat(self, peer: Peer, max_failure: int, timeout: float) -> bool:
        """One heartbeat; returns False once the peer is declared dead."""
        try:
            reply = await peer.stub.Heartbeat(kvd_pb2.HeartbeatRequest(kvd_id=self._self_id),
                                              timeout=timeout)
            if peer.kvd_id is not None and reply.kvd_id != peer.kvd_id:
                raise PeerUnavailable(f"kvd at {peer.address} restarted")
            peer.failures = 0
        except (grpc.aio.AioRpcError, PeerUnavailable) as e:
            peer.failures += 1
            self._metrics.heartbeat_failures.inc()
            logger.warning("heartbeat to kvd at %s failed (%d/%d): %s", peer.address,
                           peer.failures, max_failure, e)
            if peer.failures >= max_failure:
                peer.is_dead = True
        return not peer.is_dead

    async def close(self) -> None:
        for peer in self._peers.values():
            await peer.channel.close()
