"""The prefill side of kvd's rooms: a local worker's SendKv / SendKvAhead, until the decode
side has its KV. This is the room flow; how the bytes move and how the decode side hears of
them, path by path (same-node copies answered with a ready event, NIXL notifications, the
TransferDone RPC), is delivery.py's contract.

Contract (on kvd's asyncio loop; blocking writes run on the transfer threads):
- `send_kv`: pins the source pages, waits at most the bootstrap timeout for the room's
  Bootstrap, checks the layouts agree and the page counts match, writes the KV as one
  descriptor per run of pages adjacent on both sides, then tells the decode side with the aux
  data (carried through even if the send is cancelled meanwhile) — an error too, so that it
  fails at once. A send that ends before its Bootstrap came makes kvd refuse that Bootstrap
  later: the decode side fails at once.
- `on_handshake` / `on_bootstrap` / `on_cancel_room`: the decode kvds' side of it. A peer may
  only fill a room it was told about by the kvd it handshook with, and only the pages bound to
  that room; a cancelled room is refused from then on, and the cancel returns once a write in
  flight has ended.
- Sent ahead (`send_kv(req, aux=future)`, SendKvAhead): the aux data (first token) comes
  later; the transfer starts at once and the decode side is told only once the aux is there
  too (at most a waiting timeout; a send whose aux never comes fails the room on both sides).
  A `source_ready_event` (VRAM pools only) orders the reads after the prefill's forward pass.
- Same node, GPU to GPU, when the decode worker set `accept_ready_event`: the decode side is
  answered once the copies are queued, SendKv once they have completed.
Whatever happens (success, error, timeout, cancellation), the send unpins its pages on the way
out, once nothing it issued still reads them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from services.common import cudart
from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd.backends.base import TransferError
from services.kvd.backends.local_backend import QueuedCopy
from services.kvd.delivery import Delivery, land, write
from services.kvd.metrics import failure_reason
from services.kvd.pools import Pool, PoolLayout, check_page_ids, coalesce
from services.kvd.receiving import Receiver
from services.kvd.rooms import RoomError, RoomFlow, backend_error
from services.kvd.source_events import SourceEvents
from services.kvd.transfer import TransferJob, TransferQueues, until_done


@dataclass(slots=True)
class _KnownPeer:
    address: str
    handle: str  # backend peer handle


class Sender(RoomFlow):
    """The rooms this kvd sends for its local prefill workers (constructed with `RoomFlow`'s
    arguments and this kvd's `Receiver`)."""

    def __init__(self, *args: Any, receiver: Receiver, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queues = TransferQueues(self.settings.thread_pool_size, self.settings.queue_size)
        self.source_events = SourceEvents()  # prefill workers' events, opened here
        # the bytes and the decode side's report; same-node rooms are told in process
        self.delivery = Delivery(self.backend, receiver, self.source_events, self.settings)
        self._bootstraps: dict[str, asyncio.Future[kvd_pb2.BootstrapRequest]] = {}
        self._known: dict[str, _KnownPeer] = {}  # kvd id -> how to write to it
        self._cancelled: set[str] = set()  # rooms the decode side gave up: sends refuse them
        self._given_up: set[str] = set()  # rooms whose send ended before their bootstrap came
        self._pushing: dict[str, asyncio.Event] = {}  # room -> set when its write has ended

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

    async def _push(self, req: kvd_pb2.SendKvRequest, pool: Pool, page_ids: list[int],
                    boot: kvd_pb2.BootstrapRequest, source: int | None,
                    aux: asyncio.Future[kvd_pb2.RoomAux] | None) -> kvd_pb2.SendKvResponse:
        """Write the room's KV and report to the decode side — an error too, so that it
        fails (and frees its pages) at once instead of waiting out its timeout."""
        steps = self.delivery
        known = self._known[boot.kvd_id]
        peer = await self.peers.get(known.address)
        is_local = boot.kvd_id == self.kvd_id
        done = kvd_pb2.TransferDoneRequest(room=req.room, kvd_id=self.kvd_id, aux=req.aux)
        told = False  # the decode side has its answer (a ready event, or a notification)
        landing: asyncio.Future[Any] | None = None  # a queued copy or posted write, until done
        try:
            job, num_runs = self._job(req, pool, page_ids, boot, known)
            done.kv_bytes = job.num_bytes
            notice = steps.notice(known.handle, is_local, done, aux)
            copy = steps.prepare(req.room, job, ahead=source is not None)
            if source is not None:
                issued = await steps.await_source(req, source, copy)
            else:
                issued = steps.issue(req.room, copy) if copy is not None else None
            if issued is not None and issued.ready_event:
                queued = cast(QueuedCopy, issued)  # a same-node copy: only it has an event
                landing = steps.watch_copy(req.room, queued)
                await steps.answer_queued(req.room, done, queued, aux)
                told = True
                seconds = await steps.landed(req.room, landing)
                shard = self.queues.shard_of(self.kvd_id)
            else:
                future: asyncio.Future[Any] | Future[Any]
                if issued is not None:  # posted by the thread that saw the pages ready
                    landing = asyncio.get_running_loop().run_in_executor(
                        None, land, issued.wait, notice, True)
                    future, shard = landing, self.queues.shard_of(boot.kvd_id)
                else:
                    future, shard = self.queues.call(
                        boot.kvd_id, partial(land, partial(write, job, notice), notice))
                try:
                    seconds, told = await until_done(future)
                except TransferError as e:
                    raise backend_error(req.room, e) from None
                if aux is not None and not told:
                    done.aux.CopyFrom(await steps.await_aux(req.room, aux))
        except RoomError as e:
            self.metrics.transfer_failures.labels(e.reason).inc()
            if not told:
                done.error = str(e)
                await steps.tell(peer, done, is_local)
            raise
        except asyncio.CancelledError:
            self.metrics.transfer_failures.labels("cancelled").inc()
            if not told:
                done.error = f"room {req.room!r}: the prefill side gave up"
                asyncio.get_running_loop().create_task(steps.notify(peer, done, is_local))
            raise
        finally:
            if landing is not None and not landing.done():
                await asyncio.wait({landing})  # the source pages are read until it is done
        if not told:
            try:
                await steps.tell(peer, done, is_local, raise_errors=True)
            except RoomError as e:
                self.metrics.transfer_failures.labels(e.reason).inc()
                raise
        self.counters.bytes_sent += job.num_bytes
        self.metrics.transferred(job.backend.name, job.num_bytes, seconds)
        return kvd_pb2.SendKvResponse(
            kv_bytes=job.num_bytes, num_descriptors=num_runs, transfer_seconds=seconds,
            backend=job.backend.name, queue_shard=shard,
        )

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

    def release(self, name: str) -> bool:
        """The local decode worker gave up on a room whose bootstrap this kvd waits for (a
        same-node room): refuse it. False if none waits."""
        boot = self._bootstraps.get(name)
        if boot is None:
            return False
        if not boot.done():
            boot.cancel()
        return True

