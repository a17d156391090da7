"""kvd's rooms: the receive side waits for a room's KV, the send side pushes it.

Contract (all on kvd's asyncio loop; blocking writes run on the transfer threads):
- `expect_kv` (decode node): pins the destination pages to the room, sends the prefill node's
  kvd a Bootstrap naming them, and waits — at most the waiting timeout, and only while the peer
  answers heartbeats — for that peer's TransferDone.
- `send_kv` (prefill node): pins the source pages, waits at most the bootstrap timeout for the
  room's Bootstrap, checks the layouts agree and the page counts match, writes the KV as one
  descriptor per run of pages adjacent on both sides, then sends TransferDone with the aux data
  (carried through even if the send is cancelled meanwhile). Through a backend with
  notifications (NIXL) a successful room's TransferDone is a notification sent by the thread
  that saw the write land (notifications.py); errors, and other backends, use the RPC. A send
  that ends before its Bootstrap came makes kvd refuse that Bootstrap later: the decode side
  fails at once.
- `on_bootstrap` / `on_transfer_done`: the peer side of the two flows. A peer may only fill a
  room it was told about by the kvd it handshook with, and only the pages bound to that room.
- Sent ahead (`send_kv(req, aux=future)`, SendKvAhead): the aux data (first token) comes
  later; the transfer starts at once and the decode side is told only once the aux is there
  too (at most a waiting timeout; a send whose aux never comes fails the room on both sides).
  A `source_ready_event` (VRAM pools only) orders the reads after the prefill's forward pass:
  kvd waits for it on a thread of its own (source_events.py) before it reads anything, and
  gives up when the send is cancelled or the waiting timeout passes. A NIXL write is prepared
  beforehand and posted by that thread the moment the event completes.
- Same node, GPU to GPU, when the decode worker set `accept_ready_event`: the copies are queued
  (on the loop thread, bypassing the transfer queues), the decode side is answered at once
  (once the aux is known) with the CUDA IPC event that completes after them, and SendKv
  answers the prefill side once they have completed. (If a queued copy then fails, which takes
  a GPU fault, the decode side has already been told; kvd logs it and SendKv fails.)
Whatever happens (success, error, timeout, cancellation), each flow unpins its pages on the
way out, so every pool's accounting returns to its baseline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc

from services.common import cudart
from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd import notifications
from services.kvd.backends.base import TransferBackend, TransferError
from services.kvd.backends.local_backend import LocalBackend, PreparedCopy, QueuedCopy
from services.kvd.backends.nixl_backend import PostedWrite, PreparedWrite
from services.kvd.config import TransferSettings
from services.kvd.metrics import KvdMetrics, PoolSnapshot, Snapshot, failure_reason
from services.kvd.notifications import Notice, NotificationListener, notifies
from services.kvd.peers import Peer, PeerDirectory
from services.kvd.pools import (
    PageError,
    Pool,
    PoolLayout,
    PoolRegistry,
    check_page_ids,
    coalesce,
)
from services.kvd.source_events import Claim, SourceEvents, SourceNotReady
from services.kvd.transfer import TransferJob, TransferQueues, timed_write, until_done

logger = logging.getLogger(__name__)


class RoomError(Exception):
    """A room's flow failed; `code` is the gRPC status name to answer with, `reason` the
    metrics' stable word for the cause (default: the code in lower case)."""

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason or code.lower()


@dataclass(slots=True)
class _RecvRoom:
    pool: Pool
    page_ids: list[int]
    peer: Peer
    done: asyncio.Future[tuple[kvd_pb2.RoomAux, int, bytes]]  # TransferDone (aux, bytes,
    # ready event or b""), or the peer's death
    accepts_ready_event: bool = False  # the worker waits on a ready event before reading
    accepts_ready_flag: bool = False  # the worker polls a ready flag before reading
    in_flight: kvd_pb2.TransferDoneRequest | None = None  # aux known, the write not landed yet
    flag: kvd_pb2.ReadyFlag | None = None  # answered early: the flag that tells the worker the end
    landing: asyncio.Future[None] | None = None  # a queued copy into the pages, until done
    released: asyncio.Event = field(default_factory=asyncio.Event)  # the worker gave up
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # no write can land any more
    is_bootstrapped: bool = False  # `peer` took the bootstrap: its heartbeats now count
    listens: bool = False  # counted by the notification listener until it closes
    wakeup: asyncio.Future[None] | None = None  # what the waiting ExpectKv awaits

    def wake(self) -> None:
        """Let the waiting ExpectKv look at the room again (`done` or `released` changed).
        Called directly where they change, so that the waiter runs on the loop's next turn;
        a done-callback on `done` is only the safety net."""
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)


@dataclass(slots=True)
class _KnownPeer:
    address: str
    handle: str  # backend peer handle


@dataclass(slots=True)
class Counters:
    rooms_completed: int = 0
    rooms_failed: int = 0
    bytes_sent: int = 0
    open_sends: int = 0
    awaiting_bootstrap: int = 0  # prefill requests waiting for their destination


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
        self.queues = TransferQueues(settings.thread_pool_size, settings.queue_size)
        self.counters = Counters()
        self._recv: dict[str, _RecvRoom] = {}
        self._bootstraps: dict[str, asyncio.Future[kvd_pb2.BootstrapRequest]] = {}
        self._known: dict[str, _KnownPeer] = {}  # kvd id -> how to write to it
        self._cancelled: set[str] = set()  # rooms the decode side gave up: sends refuse them
        self._given_up: set[str] = set()  # rooms whose send ended before their bootstrap came
        self._pushing: dict[str, asyncio.Event] = {}  # room -> set when its write has ended
        self.source_events = SourceEvents()  # prefill workers' events, opened here
        # TransferDone by backend notification (NIXL), polled only while rooms wait for one
        self.listener = (NotificationListener(backend, self._on_notification)
                         if notifies(backend) else None)

    @property
    def num_open_rooms(self) -> int:
        return len(self._recv) + self.counters.open_sends + self.counters.awaiting_bootstrap

    def snapshot(self) -> Snapshot:
        """Pools and open rooms for the metrics' gauges (on the event loop)."""
        return ([PoolSnapshot(p.pool_id, p.layout.num_pages, p.num_pinned)
                 for p in self.pools.pools()], self.num_open_rooms)

    # --- decode side ----------------------------------------------------------------------

    async def expect_kv(self, req: kvd_pb2.ExpectKvRequest) -> kvd_pb2.ExpectKvResponse:
        pool = self._pool(req.pool_id)
        page_ids = list(req.page_ids)
        if req.accept_ready_flag and not page_ids:
            raise RoomError("INVALID_ARGUMENT", f"room {req.room!r}: a ready flag needs at "
                            "least one destination page (its word is the first page's)")
        if req.room in self._recv:
            raise RoomError("ALREADY_EXISTS", f"room {req.room!r} is already expected here")
        try:
            self.pools.pin(pool, req.room, page_ids, write=True)
        except PageError:
            # Pages of a room answered with a ready event stay pinned until its copy is done
            # (a few ms), those of a room answered with a ready flag until the loop has seen
            # the flag set: a worker may free and reuse them sooner. Wait for those once.
            landing = [room.landing for room in self._recv.values()
                       if room.landing is not None and not room.landing.done()]
            wanted = set(page_ids)
            landing += [asyncio.ensure_future(room.drained.wait()) for room in self._recv.values()
                        if room.flag is not None and not room.drained.is_set()
                        and room.pool is pool and not wanted.isdisjoint(room.page_ids)]
            if not landing:
                raise
            await asyncio.wait(landing)
            self.pools.pin(pool, req.room, page_ids, write=True)
        room: _RecvRoom | None = None
        may_be_written = False  # once bootstrapped, the prefill side may write at any time
        try:
            peer = await self._peer(req.peer_address)
            room = _RecvRoom(pool, page_ids, peer, asyncio.get_running_loop().create_future(),
                             accepts_ready_event=req.accept_ready_event,
                             accepts_ready_flag=req.accept_ready_flag)
            self._recv[req.room] = room
            if self.listener is not None and peer.kvd_id != self.kvd_id:
                room.listens = True
                self.listener.expect(fine=pool.memory.device is not None)
            may_be_written = True
            try:
                await self._bootstrap(req.peer_address, room, kvd_pb2.BootstrapRequest(
                    room=req.room, kvd_id=self.kvd_id, pool_id=pool.pool_id,
                    layout=pool.layout.to_proto(), pool_base_addr=pool.base_addr,
                    page_ids=page_ids))
                room.is_bootstrapped = True
            except grpc.aio.AioRpcError as e:
                # refused outright: the prefill side will not write; a lost reply might
                may_be_written = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                code = e.code().name if e.code() != grpc.StatusCode.UNKNOWN else "UNAVAILABLE"
                raise RoomError(code, f"room {req.room!r}: prefill kvd at {req.peer_address} "
                                f"refused the bootstrap: {e.details()}") from None
            early = await self._wait_for_kv(req, room)
            if early is not None:
                return self._answer_early(req.room, room, early)
            aux, num_bytes, ready_event = room.done.result()
            self.counters.rooms_completed += 1
            self.metrics.rooms_completed.labels("recv").inc()
            return kvd_pb2.ExpectKvResponse(aux=aux, kv_bytes=num_bytes, ready_event=ready_event)
        except BaseException as e:
            self.counters.rooms_failed += 1
            self.metrics.rooms_failed.labels("recv", failure_reason(e)).inc()
            raise
        finally:
            if room is not None and room.flag is not None:
                # answered early: the room goes on until its flag is final
                asyncio.get_running_loop().create_task(self._settle_flag(req.room, room))
            elif room is not None and may_be_written and not room.done.done():
                # A late write must not land in pages given to another request: keep them
                # pinned until the prefill side reports, dies, or a waiting timeout passes.
                asyncio.get_running_loop().create_task(self._drain(req.room, room))
            elif room is not None and room.landing is not None and not room.landing.done():
                # answered with a ready event: the pages stay pinned until the copy is done
                room.landing.add_done_callback(
                    lambda _: self._close_recv(req.room, pool, room))
            else:
                self._close_recv(req.room, pool, room)

    async def _peer(self, address: str, fresh: bool = False) -> Peer:
        try:
            return await self.peers.get(address, fresh)
        except RuntimeError as e:
            raise RoomError("UNAVAILABLE", str(e)) from None

    async def _bootstrap(self, address: str, room: _RecvRoom,
                         boot: kvd_pb2.BootstrapRequest) -> None:
        """Send the room's Bootstrap. A prefill kvd restarted since our handshake does not
        know us (FAILED_PRECONDITION): handshake afresh and send it once more. The room is
        bound to the kvd that took it — maybe one a concurrent room handshook with meanwhile
        (the directory's lock orders that handshake before this look-up)."""
        try:
            await room.peer.stub.Bootstrap(boot, timeout=10.0)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            room.peer = await self._peer(address, fresh=True)
            await room.peer.stub.Bootstrap(boot, timeout=10.0)
        current = await self._peer(address)
        if current.kvd_id != room.peer.kvd_id:
            room.peer = current

    async def _wait_for_kv(self, req: kvd_pb2.ExpectKvRequest, room: _RecvRoom
                           ) -> kvd_pb2.TransferDoneRequest | None:
        """Until the room is done (None: `room.done` has the result), or — for a worker that
        accepts a ready flag — its aux data is known while the write is in flight (returned)."""
        timeout = req.timeout_seconds or self.settings.waiting_timeout
        room.done.add_done_callback(lambda _: room.wake())
        try:
            async with asyncio.timeout(timeout):
                while not room.done.done() and not room.released.is_set():
                    if room.in_flight is not None:
                        return room.in_flight
                    room.wakeup = asyncio.get_running_loop().create_future()
                    await room.wakeup
        except TimeoutError:
            pass
        if room.done.done():
            room.done.result()  # raises the room's error
            return None
        if room.released.is_set():
            raise RoomError("CANCELLED", f"room {req.room!r} was released", "cancelled")
        raise RoomError("DEADLINE_EXCEEDED", f"room {req.room!r}: no KV from the prefill side "
                        f"within {timeout:g}s", "timeout")

    def _answer_early(self, name: str, room: _RecvRoom, early: kvd_pb2.TransferDoneRequest
                      ) -> kvd_pb2.ExpectKvResponse:
        """The worker's answer while the KV is in flight: the aux data and the room's ready
        flag, which the landing notification's thread sets (or `_settle_flag`)."""
        flags = room.pool.flags
        room.flag = kvd_pb2.ReadyFlag(index=room.page_ids[0], ticket=flags.next_ticket())
        index, ticket = room.flag.index, room.flag.ticket
        if self.listener is not None:
            self.listener.arm(name, _agent_of(self.backend, room.peer.backend_metadata),
                              partial(flags.flags.set_landed, index, ticket))
        self.metrics.early_answers.inc()
        return kvd_pb2.ExpectKvResponse(aux=early.aux, kv_bytes=early.kv_bytes,
                                        ready_flag=room.flag)

    async def _settle_flag(self, name: str, room: _RecvRoom) -> None:
        """A room answered with a ready flag, to its end: the flag reads LANDED once the
        prefill side reports the landing, or FAILED once no write into the pages can land any
        more (an error, the peer's death, the waiting timeout, or the worker's ReleaseRoom,
        after the prefill kvd confirmed the cancel). The pages stay pinned until then."""
        assert room.flag is not None
        flags, index, ticket = room.pool.flags.flags, room.flag.index, room.flag.ticket
        landed = False
        try:
            room.done.add_done_callback(lambda _: room.wake())
            try:
                async with asyncio.timeout(self.settings.waiting_timeout):
                    while not room.done.done() and not room.released.is_set():
                        room.wakeup = asyncio.get_running_loop().create_future()
                        await room.wakeup
            except TimeoutError:
                pass
            landed = (room.done.done() and not room.done.cancelled()
                      and room.done.exception() is None)
            if not landed:
                await self._drain(name, room)
                landed = (room.done.done() and not room.done.cancelled()
                          and room.done.exception() is None)
        finally:
            if self.listener is not None:
                self.listener.disarm(name)
            self._close_recv(name, room.pool, room)  # unpinned before the worker may reuse
            if landed:
                flags.set_landed(index, ticket)
                self.counters.rooms_completed += 1
                self.metrics.rooms_completed.labels("recv").inc()
            else:
                flags.set_failed(index, ticket)
                self.counters.rooms_failed += 1
                reason = ("cancelled" if room.released.is_set() else
                          failure_reason(room.done.exception()) if room.done.done()
                          and not room.done.cancelled() else "timeout")
                self.metrics.rooms_failed.labels("recv", reason).inc()
                logger.warning("room %s failed after its worker was answered early (%s); its "
                               "ready flag says so", name, reason)

    async def _drain(self, name: str, room: _RecvRoom) -> None:
        """Until no write into the room's pages can land: the prefill kvd confirms it cancelled
        the room, reports the transfer, dies, or a waiting timeout passes."""
        cancel = asyncio.ensure_future(room.peer.stub.CancelRoom(
            kvd_pb2.CancelRoomRequest(room=name, kvd_id=self.kvd_id),
            timeout=self.settings.waiting_timeout))
        try:
            await asyncio.wait({cancel, room.done}, timeout=self.settings.waiting_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if not room.done.done() and cancel.done() and cancel.exception() is not None:
                # the prefill kvd could not confirm: rely on TransferDone, heartbeats, timeout
                await asyncio.wait_for(asyncio.shield(room.done), self.settings.waiting_timeout)
        except BaseException:  # noqa: BLE001 - any outcome ends the drain
            pass
        finally:
            cancel.cancel()
            if room.landing is not None and not room.landing.done():
                # told after the drain began (a send ahead whose aux came late): the pages stay
                # pinned until its queued copy is done
                room.landing.add_done_callback(lambda _: self._close_recv(name, room.pool, room))
            else:
                self._close_recv(name, room.pool, room)

    def _close_recv(self, name: str, pool: Pool, room: _RecvRoom | None) -> None:
        if room is not None and self._recv.get(name) is room:
            del self._recv[name]
            if room.listens and self.listener is not None:
                self.listener.forget(fine=room.pool.memory.device is not None)
        if room is None or not room.drained.is_set():
            self.pools.unpin(pool, name)
        if room is not None:
            room.drained.set()
            if not room.done.done():
                room.done.cancel()

    def on_transfer_done(self, req: kvd_pb2.TransferDoneRequest, ready_event: bytes = b"",
                         via: str = "rpc") -> None:
        """The prefill side's report (`ready_event`: set only in-process, by a queued copy;
        `via`: how it came, for the metrics)."""
        room = self._recv.get(req.room)
        if room is None:
            raise RoomError("NOT_FOUND", f"room {req.room!r} is not expected here")
        if room.peer.kvd_id != req.kvd_id:
            raise RoomError("PERMISSION_DENIED",
                            f"room {req.room!r} expects KV from kvd {room.peer.kvd_id}")
        if room.done.done():
            return
        if req.in_flight:  # the aux data, ahead of the landing
            if not req.error and room.accepts_ready_flag and room.in_flight is None:
                room.in_flight = req
                room.wake()
            return
        if req.error:
            room.done.set_exception(RoomError("UNAVAILABLE", f"prefill side: {req.error}",
                                              "sender_failed"))
        else:
            room.done.set_result((req.aux, req.kv_bytes, ready_event))
            self.metrics.transfer_done.labels(via).inc()
        room.wake()

    def _on_notification(self, sender: str, message: bytes) -> None:
        """A backend notification (notifications.py): a prefill kvd's TransferDone, taken only
        from the agent of the kvd the room was bootstrapped with."""
        try:
            done = notifications.decode(message)
        except ValueError as e:
            logger.warning("dropped a notification from %s: %s", sender, e)
            return
        room = self._recv.get(done.room)
        if room is None:
            logger.info("TransferDone notification for room %s, which is no longer expected "
                        "here", done.room)
            return
        agent = _agent_of(self.backend, room.peer.backend_metadata)
        if agent != sender:
            logger.warning("dropped a TransferDone notification for room %s from agent %s: it "
                           "expects one from %s", done.room, sender, agent)
            return
        try:
            self.on_transfer_done(done, via="notification")
        except RoomError as e:
            logger.warning("TransferDone notification for room %s: %s", done.room, e)

    async def heartbeat_loop(self) -> None:
        """Fail the rooms waiting on a prefill kvd that stopped answering."""
        s = self.settings
        while True:
            await asyncio.sleep(s.heartbeat_interval)
            for peer in {room.peer for room in self._recv.values() if room.is_bootstrapped}:
                alive = await self.peers.heartbeat(peer, s.heartbeat_max_failure,
                                                   timeout=max(s.heartbeat_interval, 0.5))
                if alive:
                    continue
                for name, room in list(self._recv.items()):
                    if room.peer is peer and room.is_bootstrapped and not room.done.done():
                        room.done.set_exception(RoomError(
                            "UNAVAILABLE", f"room {name!r}: prefill kvd at {peer.address} missed "
                            f"{s.heartbeat_max_failure} heartbeats", "peer_dead"))

    # --- prefill side ---------------------------------------------------------------------

    def on_handshake(self, req: kvd_pb2.HandshakeRequest) -> None:
        if req.backend != self.backend.name:
            self.metrics.handshake_failures.labels("backend_mismatch").inc()
            raise RoomError("FAILED_PRECONDITION", f"transfer backend differs: "
                            f"{self.backend.name!r} here, {req.backend!r} at {req.peer_address}")
        try:
            if req.kvd_id == self.kvd_id:  # same node: copy between two pools of this kvd
                handle = self.local_backend.connect(self.local_backend.metadata())
            else:
                handle = self.backend.connect(req.backend_metadata)
        except Exception:
            self.metrics.handshake_failures.labels("backend_error").inc()
            raise
        self._known[req.kvd_id] = _KnownPeer(req.peer_address, handle)

    def on_bootstrap(self, req: kvd_pb2.BootstrapRequest) -> None:
        if req.room in self._cancelled:
            raise RoomError("ABORTED", f"room {req.room!r} was cancelled by the decode side")
        if req.room in self._given_up:  # else the decode side would wait for a send long gone
            raise RoomError("ABORTED", f"room {req.room!r}: the prefill side gave up on it "
                            "before its bootstrap arrived")
        if req.kvd_id not in self._known:
            raise RoomError("FAILED_PRECONDITION", f"kvd {req.kvd_id!r} has not handshaken")
        try:
            layout = PoolLayout.from_proto(req.layout)
            check_page_ids(list(req.page_ids), layout.num_pages)
        except ValueError as e:
            raise RoomError("INVALID_ARGUMENT", f"room {req.room!r}: {e}") from None
        future = self._boot_future(req.room)
        if future.done():
            raise RoomError("ALREADY_EXISTS", f"room {req.room!r} was already bootstrapped")
        future.set_result(req)

    def _boot_future(self, room: str) -> asyncio.Future[kvd_pb2.BootstrapRequest]:
        """The room's bootstrap, whichever side asks first. Forgotten after the bootstrap and
        waiting timeouts: by then the decode side has given up on the room anyway."""
        future = self._bootstraps.get(room)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._bootstraps[room] = loop.create_future()
            loop.call_later(self.settings.bootstrap_timeout + self.settings.waiting_timeout,
                            self._expire_bootstrap, room, future)
        return future

    def _expire_bootstrap(self, room: str, future: asyncio.Future) -> None:
        if self._bootstraps.get(room) is future:
            del self._bootstraps[room]
            if not future.done():
                future.cancel()

    async def _await_boot(self, room: str, timeout: float) -> kvd_pb2.BootstrapRequest:
        if room in self._cancelled:
            raise RoomError("ABORTED", f"room {room!r} was cancelled by the decode side")
        future = self._boot_future(room)
        if future.done() and not future.cancelled():  # the usual case: no timer, no task
            return future.result()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise RoomError("DEADLINE_EXCEEDED", f"room {room!r}: the decode side did not "
                            f"bootstrap within {timeout:g}s", "timeout") from None
        except asyncio.CancelledError:
            if future.cancelled():  # ReleaseRoom / CancelRoom: the decode side gave up first
                raise RoomError("ABORTED", f"room {room!r}: the decode side released it before "
                                "its KV was sent", "cancelled") from None
            raise

    async def on_cancel_room(self, req: kvd_pb2.CancelRoomRequest) -> None:
        """The decode side gave up on the room: refuse its bootstrap and sends from now on, and
        return once a write already in flight has ended."""
        room = req.room
        self._forget_later(self._cancelled, room)
        future = self._bootstraps.get(room)
        if future is not None and not future.done():
            future.cancel()
        pushing = self._pushing.get(room)
        if pushing is not None:
            await pushing.wait()

    def _forget_later(self, rooms: set[str], room: str) -> None:
        """Add `room` to `rooms` until a bootstrap and a waiting timeout have passed: by then
        no side still waits for it."""
        if room not in rooms:
            rooms.add(room)
            s = self.settings
            asyncio.get_running_loop().call_later(s.bootstrap_timeout + s.waiting_timeout,
                                                  rooms.discard, room)

    async def await_bootstrap(self, req: kvd_pb2.AwaitBootstrapRequest
                              ) -> kvd_pb2.AwaitBootstrapResponse:
        """Until the decode side has reserved the room's pages (its Bootstrap arrived)."""
        self.counters.awaiting_bootstrap += 1
        try:
            boot = await self._await_boot(req.room,
                                          req.timeout_seconds or self.settings.bootstrap_timeout)
        finally:
            self.counters.awaiting_bootstrap -= 1
        return kvd_pb2.AwaitBootstrapResponse(num_pages=len(boot.page_ids))

    async def send_kv(self, req: kvd_pb2.SendKvRequest,
                      aux: asyncio.Future[kvd_pb2.RoomAux] | None = None
                      ) -> kvd_pb2.SendKvResponse:
        """`aux`: the room's aux data arrives later through this future (SendKvAhead; a
        RoomError set on it fails the room), instead of in `req.aux`."""
        pool = self._pool(req.pool_id)
        page_ids = list(req.page_ids)
        source = self._source_device(req, pool)
        self.pools.pin(pool, req.room, page_ids, write=False)
        self.counters.open_sends += 1
        future = self._boot_future(req.room)
        pushing: asyncio.Event | None = None
        try:
            boot = await self._await_boot(req.room,
                                          req.timeout_seconds or self.settings.bootstrap_timeout)
            if req.room in self._cancelled:  # between the bootstrap and now
                raise RoomError("ABORTED", f"room {req.room!r}: the decode side released it "
                                "before its KV was sent")
            pushing = self._pushing[req.room] = asyncio.Event()  # no await since the check
            response = await self._push(req, pool, page_ids, boot, source, aux)
            self.counters.rooms_completed += 1
            self.metrics.rooms_completed.labels("send").inc()
            return response
        except BaseException as e:
            self.counters.rooms_failed += 1
            self.metrics.rooms_failed.labels("send", failure_reason(e)).inc()
            if pushing is None:  # nothing was written or reported: refuse a late bootstrap
                self._forget_later(self._given_up, req.room)
            raise
        finally:
            if pushing is not None:
                pushing.set()
                if self._pushing.get(req.room) is pushing:
                    del self._pushing[req.room]
            self.counters.open_sends -= 1
            if self._bootstraps.get(req.room) is future:
                del self._bootstraps[req.room]
            self.pools.unpin(pool, req.room)

    def _source_device(self, req: kvd_pb2.SendKvRequest, pool: Pool) -> int | None:
        """kvd's GPU of the pool whose `source_ready_event` the request names, or None when it
        names none."""
        if not req.source_ready_event:
            return None
        if pool.memory.device is None:
            raise RoomError("INVALID_ARGUMENT", f"room {req.room!r}: source_ready_event names a "
                            f"CUDA event, but pool {pool.pool_id} is in host memory")
        if len(req.source_ready_event) != cudart.IPC_HANDLE_BYTES:
            raise RoomError("INVALID_ARGUMENT", f"room {req.room!r}: source_ready_event has "
                            f"{len(req.source_ready_event)} bytes, a CUDA IPC event handle "
                            f"{cudart.IPC_HANDLE_BYTES}")
        return pool.memory.device

    async def _await_source(self, req: kvd_pb2.SendKvRequest, device: int,
                            copy: PreparedCopy | PreparedWrite | None
                            ) -> QueuedCopy | PostedWrite | None:
        """Until the prefill's forward pass has finished the pages (see source_events.py).
        `copy` is issued by the thread that saw them ready, at once (no hop back to this loop
        before the bytes move), and what it issued returned. When this raises, nothing reads
        the pages any more."""
        timeout = self.settings.waiting_timeout
        claim = Claim()
        try:
            return await asyncio.wrap_future(self.source_events.wait(
                req.source_ready_event, device, claim, time.monotonic() + timeout,
                copy.issue if copy is not None else None))
        except BaseException as e:
            ran, queued = claim.abandon()  # stops the polling, unless the copy went out first
            if copy is not None and not ran:
                copy.discard()
            if queued is not None:  # issued just before a cancellation: it reads the pages
                landing = asyncio.get_running_loop().run_in_executor(None, queued.wait)
                await asyncio.wait({landing})
                landing.cancelled() or landing.exception()  # retrieved: the room failed anyway
            failure = _source_failure(req.room, e, timeout)
            if failure is e:
                raise
            raise failure from None

    async def _push(self, req: kvd_pb2.SendKvRequest, pool: Pool, page_ids: list[int],
                    boot: kvd_pb2.BootstrapRequest, source: int | None,
                    aux: asyncio.Future[kvd_pb2.RoomAux] | None) -> kvd_pb2.SendKvResponse:
        """Write the room's KV and report to the decode side — an error too, so that it
        fails (and frees its pages) at once instead of waiting out its timeout."""
        known = self._known[boot.kvd_id]
        peer = await self.peers.get(known.address)
        is_local = boot.kvd_id == self.kvd_id
        done = kvd_pb2.TransferDoneRequest(room=req.room, kvd_id=self.kvd_id, aux=req.aux)
        told = False  # the decode side has its answer (a ready event, or a notification)
        landing: asyncio.Future[Any] | None = None  # a queued copy or posted write, until done
        try:
            job, num_runs = self._job(req, pool, page_ids, boot, known)
            done.kv_bytes = job.num_bytes
            notice = self._notice(known, is_local, done, aux)
            copy = self._prepare_copy(req.room, job, ahead=source is not None)
            if source is not None:
                issued = await self._await_source(req, source, copy)
            else:
                issued = self._issue(req.room, copy) if copy is not None else None
            loop = asyncio.get_running_loop()
            if issued is not None and issued.ready_event:
                landing = loop.run_in_executor(None, issued.wait)
                recv = self._recv.get(req.room)  # kept until this send ends (_drain waits)
                if recv is not None:
                    recv.landing = landing
                await self._answer_queued(req.room, done, issued, aux)
                told = True
                seconds = await self._landed(req.room, landing)
                shard = self.queues.shard_of(self.kvd_id)
            else:
                if issued is not None:  # posted by the thread that saw the pages ready
                    landing = loop.run_in_executor(None, _land, issued.wait, notice, True)
                    future, shard = landing, self.queues.shard_of(boot.kvd_id)
                else:
                    future, shard = self.queues.call(
                        boot.kvd_id, partial(_land, partial(_write, job, notice), notice))
                try:
                    seconds, told = await until_done(future)
                except TransferError as e:
                    raise _backend_error(req.room, e) from None
                if aux is not None and not told:
                    done.aux.CopyFrom(await self._await_aux(req.room, aux))
        except RoomError as e:
            self.metrics.transfer_failures.labels(e.reason).inc()
            if not told:
                done.error = str(e)
                await self._tell(peer, done, is_local)
            raise
        except asyncio.CancelledError:
            self.metrics.transfer_failures.labels("cancelled").inc()
            if not told:
                done.error = f"room {req.room!r}: the prefill side gave up"
                asyncio.get_running_loop().create_task(self._notify(peer, done, is_local))
            raise
        finally:
            if landing is not None and not landing.done():
                await asyncio.wait({landing})  # the source pages are read until it is done
        if not told:
            try:
                await self._tell(peer, done, is_local, raise_errors=True)
            except RoomError as e:
                self.metrics.transfer_failures.labels(e.reason).inc()
                raise
        self.counters.bytes_sent += job.num_bytes
        self.metrics.transferred(job.backend.name, job.num_bytes, seconds)
        return kvd_pb2.SendKvResponse(
            kv_bytes=job.num_bytes, num_descriptors=num_runs, transfer_seconds=seconds,
            backend=job.backend.name, queue_shard=shard,
        )

    async def _await_aux(self, room: str, aux: asyncio.Future[kvd_pb2.RoomAux]
                         ) -> kvd_pb2.RoomAux:
        timeout = self.settings.waiting_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(aux), timeout)
        except TimeoutError:
            raise RoomError("DEADLINE_EXCEEDED", f"room {room!r}: the prefill worker sent no "
                            f"first token within {timeout:g}s of its KV", "timeout") from None

    def _prepare_copy(self, room: str, job: TransferJob, ahead: bool
                      ) -> PreparedCopy | PreparedWrite | None:
        """The room's transfer planned, for the thread that sees its pages ready (`ahead`)
        or this loop to issue: the same-node GPU copies of a room whose decode worker accepts
        a ready event, or (`ahead`) a backend's write that can be prepared (NIXL). None when
        neither applies: the transfer queues write it."""
        try:
            if isinstance(job.backend, LocalBackend):
                recv = self._recv.get(room)
                if recv is None or not recv.accepts_ready_event:
                    return None
                return job.backend.prepare_async(job.peer, job.src, job.dst_addrs)
            prepare = getattr(job.backend, "prepare_write", None)
            if not ahead or prepare is None:
                return None
            return prepare(job.peer, job.src, job.dst_addrs)
        except TransferError as e:
            raise _backend_error(room, e) from None

    def _notice(self, known: _KnownPeer, is_local: bool, done: kvd_pb2.TransferDoneRequest,
                aux: asyncio.Future[kvd_pb2.RoomAux] | None) -> Notice | None:
        """The room's TransferDone as a notification the transfer thread sends (NIXL peers),
        its message set once the aux data is known; None where the RPC tells."""
        if is_local or not notifies(self.backend):
            return None
        notice = Notice(self.backend, known.handle, done.room)

        def fill(aux_data: kvd_pb2.RoomAux | None) -> None:
            message = kvd_pb2.TransferDoneRequest()
            message.CopyFrom(done)
            if aux_data is not None:
                message.aux.CopyFrom(aux_data)
            notice.set_aux(message)

        if aux is None:
            fill(None)
        else:
            aux.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else fill(f.result()))
        return notice

    @staticmethod
    def _issue(room: str, copy: PreparedCopy | PreparedWrite) -> QueuedCopy | PostedWrite:
        try:
            return copy.issue()
        except TransferError as e:
            raise _backend_error(room, e) from None

    async def _answer_queued(self, room: str, done: kvd_pb2.TransferDoneRequest,
                             queued: QueuedCopy, aux: asyncio.Future[kvd_pb2.RoomAux] | None
                             ) -> None:
        """Answer the decode side with the ready event of the queued copy, as soon as the aux
        data is known (the prefill side is answered once the copy is done)."""
        if aux is not None:
            done.aux.CopyFrom(await self._await_aux(room, aux))
        try:
            self.on_transfer_done(done, ready_event=queued.ready_event, via="in_process")
        except RoomError as e:  # the decode side gave up while the aux was awaited
            raise RoomError("ABORTED", f"room {room!r}: the decode side did not take its KV: "
                            f"{e}", "notify_failed") from None
        await asyncio.sleep(0)  # let the woken ExpectKv answer first

    async def _landed(self, room: str, landing: asyncio.Future[float]) -> float:
        """The queued copy's GPU seconds, once it is done (the decode side has been told)."""
        try:
            return await until_done(landing)
        except TransferError as e:
            logger.error("room %s: a queued GPU copy failed after the decode side was told it "
                         "would complete: %s", room, e)
            raise _backend_error(room, e) from None

    async def _tell(self, peer: Peer, done: kvd_pb2.TransferDoneRequest, is_local: bool,
                    raise_errors: bool = False) -> None:
        """`_notify`, carried through even if this send is cancelled meanwhile (a prefill
        worker that goes away mid-notice): the decode side must hear of its room either way."""
        notice = asyncio.ensure_future(self._notify(peer, done, is_local, raise_errors))
        notice.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        await asyncio.shield(notice)

    async def _notify(self, peer: Peer, done: kvd_pb2.TransferDoneRequest, is_local: bool,
                      raise_errors: bool = False) -> None:
        """TransferDone to the decode side: in-process when it is this kvd (`is_local`, the
        same-node path: saves a loopback RPC on the critical path), else over gRPC."""
        if not is_local:
            await _notify(peer, done, raise_errors)
            return
        try:
            self.on_transfer_done(done, via="in_process")
        except RoomError as e:
            logger.warning("TransferDone for room %s here failed: %s", done.room, e)
            if raise_errors:
                raise RoomError("UNAVAILABLE", f"room {done.room!r}: the decode side did not "
                                f"take the KV: {e}", "notify_failed") from None
            return
        # Let the woken ExpectKv answer the decode worker before this SendKv answers the
        # prefill worker: decode's wait is on a request's critical path, prefill's is not.
        await asyncio.sleep(0)

    def _job(self, req: kvd_pb2.SendKvRequest, pool: Pool, page_ids: list[int],
             boot: kvd_pb2.BootstrapRequest, known: _KnownPeer) -> tuple[TransferJob, int]:
        why = pool.layout.mismatch(PoolLayout.from_proto(boot.layout))
        if why:
            raise RoomError("FAILED_PRECONDITION", f"room {req.room!r}: KV layouts differ: {why}",
                            "layout_mismatch")
        if len(boot.page_ids) != len(page_ids):
            raise RoomError("FAILED_PRECONDITION", f"room {req.room!r}: {len(page_ids)} source "
                            f"pages but {len(boot.page_ids)} destination pages",
                            "page_count_mismatch")
        backend = self.local_backend if boot.kvd_id == self.kvd_id else self.backend
        page_bytes = pool.layout.page_bytes
        runs = coalesce(page_ids, list(boot.page_ids))
        job = TransferJob(
            backend, known.handle,
            [(pool.page_addr(s), n * page_bytes) for s, _, n in runs],
            [boot.pool_base_addr + d * page_bytes for _, d, n in runs],
        )
        return job, len(runs)

    # --- both ------------------------------------------------------------------------------

    async def release_room(self, name: str) -> bool:
        """The worker gives up on a room. Returns once no write into its pages can still land
        (at most a waiting timeout): only then may the worker reuse them."""
        existed = False
        room = self._recv.get(name)
        if room is not None:
            room.released.set()
            room.wake()
            await asyncio.wait_for(room.drained.wait(), self.settings.waiting_timeout + 5.0)
            existed = True
        boot = self._bootstraps.get(name)
        if boot is not None:
            if not boot.done():
                boot.cancel()
            existed = True
        return existed

    def _pool(self, pool_id: str) -> Pool:
        try:
            return self.pools.get(pool_id)
        except KeyError as e:
            raise RoomError("NOT_FOUND", str(e.args[0])) from None


def _source_failure(room: str, e: BaseException, timeout: float) -> BaseException:
    """What a failed wait for a source_ready_event fails its room with (`e` itself if it is no
    failure of the wait's own, a cancellation say)."""
    if isinstance(e, SourceNotReady):
        return RoomError("DEADLINE_EXCEEDED", f"room {room!r}: {e} (waited up to {timeout:g}s)",
                         "timeout")
    if isinstance(e, ValueError):
        return RoomError("INVALID_ARGUMENT", f"room {room!r}: {e}")
    if isinstance(e, cudart.CudaError):
        return RoomError("UNAVAILABLE", f"room {room!r}: waiting for the prefill's "
                         f"source_ready_event failed: {e}", "backend_error")
    if isinstance(e, TransferError):  # issuing the copy
        return _backend_error(room, e)
    return e


def _write(job: TransferJob, notice: Notice | None) -> float:
    """On a transfer thread: the job's blocking write, its seconds; through a backend that
    notifies, the decode side is told once it is posted (it then polls finely)."""
    if notice is None:
        return timed_write(job)
    prepared = job.backend.prepare_write(job.peer, job.src, job.dst_addrs)  # type: ignore
    if prepared is None:
        return 0.0
    posted = prepared.issue()
    notice.posted()
    return posted.wait()


def _land(wait: Callable[[], float], notice: Notice | None,
          tell_posted: bool = False) -> tuple[float, bool]:
    """On the thread that waits for a write (`tell_posted`: one posted by another thread,
    the decode side not yet told so — not from the event-polling thread, which has other
    rooms to watch): its seconds, and whether the decode side was told by notification the
    moment it landed."""
    if tell_posted and notice is not None:
        notice.posted()
    seconds = wait()
    return seconds, notice is not None and notice.send()


def _agent_of(backend: TransferBackend, metadata: bytes) -> str | None:
    """The backend peer that metadata from a handshake names (None if it names none)."""
    try:
        return backend.peer_name(metadata)  # type: ignore[attr-defined]
    except (AttributeError, TransferError):
        return None


def _backend_error(room: str, e: TransferError) -> RoomError:
    """A transfer backend's failure, as the room's."""
    return RoomError("UNAVAILABLE", f"room {room!r}: {e}", "backend_error")


async def _notify(peer: Peer, done: kvd_pb2.TransferDoneRequest,
                  raise_errors: bool = False) -> None:
    try:
        await peer.stub.TransferDone(done, timeout=10.0)
    except grpc.aio.AioRpcError as e:
        logger.warning("TransferDone for room %s to %s failed: %s", done.room, peer.address,
                       e.details())
        if raise_errors:
            raise RoomError("UNAVAILABLE", f"room {done.room!r}: the decode side did not take "
                            f"the KV: {e.code().name}: {e.details()}", "notify_failed") from None
