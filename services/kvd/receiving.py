"""The decode side of kvd's rooms: a local worker's ExpectKv, until the room's KV is there.

Contract (on kvd's asyncio loop):
- `expect_kv`: pins the destination pages to the room, sends the prefill node's kvd a
  Bootstrap naming them, and waits — at most the waiting timeout, and only while the peer
  answers heartbeats — for that peer's TransferDone (by RPC, by NIXL notification, or in
  process from this kvd's own send of a same-node room). A worker that accepts a ready event
  is answered as soon as a same-node copy is queued, with the event that completes after it.
  A worker that accepts a ready flag (services/common/ready_flags.py) is answered as soon as
  an in-flight report brings the first token while another kvd's write is under way; the
  listener thread sets the flag the moment the landing report comes, and `_settle_flag` makes
  it final: LANDED, or FAILED once nothing can land in the pages any more.
- `on_transfer_done`: the prefill side's report; taken only from the kvd the room was
  bootstrapped with (notifications: only from that kvd's NIXL agent).
- `release`: the worker gives up; returns once no write into the pages can still land.
Whatever happens, the room unpins its pages on the way out — pages of a room answered early
only once its copy is done or its flag is final.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

import grpc

from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd import notifications
from services.kvd.metrics import failure_reason
from services.kvd.notifications import NotificationListener, notifies
from services.kvd.peers import Peer
from services.kvd.pools import PageError, Pool
from services.kvd.recv_room import RecvRoom
from services.kvd.rooms import RoomError, RoomFlow, agent_of

logger = logging.getLogger(__name__)


class Receiver(RoomFlow):
    """The rooms this kvd expects for its local decode workers (constructed with
    `RoomFlow`'s arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._recv: dict[str, RecvRoom] = {}
        self._background: set[asyncio.Task[None]] = set()  # drains and flag settlements
        # rooms answered with a ready flag -> (who reports their landing: the prefill kvd's
        # NIXL agent, or None for this kvd's own copy; what sets the flag)
        self._armed: dict[str, tuple[str | None, Callable[[], None]]] = {}
        self._armed_lock = threading.Lock()  # `landed_now` comes from other threads
        # TransferDone by backend notification (NIXL), polled only while rooms wait for one
        self.listener = (NotificationListener(self.backend, self._on_notification,
                                              self.landed_now)
                         if notifies(self.backend) else None)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` beyond the ExpectKv that started it (held here until it ends: the loop
        keeps only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def num_rooms(self) -> int:
        return len(self._recv)

    def room(self, name: str) -> RecvRoom | None:
        """An expected room (the send side's same-node path looks at its worker's wishes)."""
        return self._recv.get(name)

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
            landing: list[asyncio.Future[Any]] = [
                room.landing for room in self._recv.values()
                if room.landing is not None and not room.landing.done()]
            wanted = set(page_ids)
            landing += [asyncio.ensure_future(room.drained.wait()) for room in self._recv.values()
                        if room.flag is not None and not room.drained.is_set()
                        and room.pool is pool and not wanted.isdisjoint(room.page_ids)]
            if not landing:
                raise
            await asyncio.wait(landing)
            self.pools.pin(pool, req.room, page_ids, write=True)
        room: RecvRoom | None = None
        may_be_written = False  # once bootstrapped, the prefill side may write at any time
        try:
            peer = await self._peer(req.peer_address)
            room = RecvRoom(pool, page_ids, peer, asyncio.get_running_loop().create_future(),
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
                self._spawn(self._settle_flag(req.room, room))
            elif room is not None and may_be_written and not room.done.done():
                # A late write must not land in pages given to another request: keep them
                # pinned until the prefill side reports, dies, or a waiting timeout passes.
                self._spawn(self._drain(req.room, room))
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

    async def _bootstrap(self, address: str, room: RecvRoom,
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

    async def _wait_for_kv(self, req: kvd_pb2.ExpectKvRequest, room: RecvRoom
                           ) -> kvd_pb2.TransferDoneRequest | None:
        """Until the room is done (None: `room.done` has the result), or — for a worker that
        accepts a ready flag — its aux data is known while the write is in flight (returned)."""
        timeout = req.timeout_seconds or self.settings.waiting_timeout
        await room.until_changed(timeout, early=True)
        if not room.done.done() and not room.released.is_set() and room.in_flight is not None:
            return room.in_flight
        if room.done.done():
            room.done.result()  # raises the room's error
            return None
        if room.released.is_set():
            raise RoomError("CANCELLED", f"room {req.room!r} was released", "cancelled")
        raise RoomError("DEADLINE_EXCEEDED", f"room {req.room!r}: no KV from the prefill side "
                        f"within {timeout:g}s", "timeout")

    def _answer_early(self, name: str, room: RecvRoom, early: kvd_pb2.TransferDoneRequest
                      ) -> kvd_pb2.ExpectKvResponse:
        """The worker's answer while the KV is in flight: the aux data and the room's ready
        flag, which the landing notification's thread sets (or `_settle_flag`)."""
        flags = room.pool.flags
        room.flag = kvd_pb2.ReadyFlag(index=room.page_ids[0], ticket=flags.next_ticket())
        on_landed = partial(flags.flags.set_landed, room.flag.index, room.flag.ticket)
        local = room.peer.kvd_id == self.kvd_id  # a copy this kvd queued
        reporter = None if local else agent_of(self.backend, room.peer.backend_metadata)
        if local or reporter is not None:
            with self._armed_lock:
                self._armed[name] = (reporter, on_landed)
        self.metrics.early_answers.inc()
        return kvd_pb2.ExpectKvResponse(aux=early.aux, kv_bytes=early.kv_bytes,
                                        ready_flag=room.flag)

    async def _settle_flag(self, name: str, room: RecvRoom) -> None:
        """A room answered with a ready flag, to its end: the flag reads LANDED once the
        prefill side reports the landing, or FAILED once no write into the pages can land any
        more (an error, the peer's death, the waiting timeout, or the worker's ReleaseRoom,
        after the prefill kvd confirmed the cancel). The pages stay pinned until then."""
        assert room.flag is not None
        flags, index, ticket = room.pool.flags.flags, room.flag.index, room.flag.ticket
        landed = False
        try:
            await room.until_changed(self.settings.waiting_timeout)
            landed = room.landed
            if not landed:
                await self._drain(name, room)
                landed = room.landed
        finally:
            with self._armed_lock:
                self._armed.pop(name, None)
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

    async def _drain(self, name: str, room: RecvRoom) -> None:
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

    def _close_recv(self, name: str, pool: Pool, room: RecvRoom | None) -> None:
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
        if ready_event and room.accepts_ready_flag and room.landing is not None:
            # a same-node copy queued by this kvd: an in-flight report, done with the copy
            room.landing.add_done_callback(partial(self._copied, room, req, via))
            req = kvd_pb2.TransferDoneRequest(room=req.room, kvd_id=req.kvd_id, aux=req.aux,
                                              kv_bytes=req.kv_bytes, in_flight=True)
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

    def _copied(self, room: RecvRoom, req: kvd_pb2.TransferDoneRequest, via: str,
                landing: asyncio.Future[float]) -> None:
        """A same-node copy into a ready-flag room ended (its `landing`, on the loop)."""
        if room.done.done():
            return
        if landing.cancelled() or landing.exception() is not None:
            room.done.set_exception(RoomError("UNAVAILABLE", f"room {req.room!r}: the "
                                              "same-node copy failed", "backend_error"))
        else:
            room.done.set_result((req.aux, req.kv_bytes, b""))
            self.metrics.transfer_done.labels(via).inc()
        room.wake()

    def landed_now(self, name: str, reporter: str | None = None) -> None:
        """From any thread: the room's KV is in its pages — by the landing notification of
        NIXL agent `reporter`, or (None) this kvd's own copy is done. Sets the room's ready
        flag now if its worker was answered with one and `reporter` is who the room expects
        the report from (the loop settles the flag anyway)."""
        with self._armed_lock:
            armed = self._armed.get(name)
            if armed is None or armed[0] != reporter:
                return
            del self._armed[name]
        armed[1]()

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
        agent = agent_of(self.backend, room.peer.backend_metadata)
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

    async def release(self, name: str) -> bool:
        """The worker gives up on a room it expects: returns (True) once no write into its
        pages can still land (at most a waiting timeout); False if it expects no such room."""
        room = self._recv.get(name)
        if room is None:
            return False
        room.released.set()
        room.wake()
        await asyncio.wait_for(room.drained.wait(), self.settings.waiting_timeout + 5.0)
        return True
