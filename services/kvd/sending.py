"""The prefill side of kvd's rooms: a local worker's SendKv / SendKvAhead, until the decode
side has its KV.

Contract (on kvd's asyncio loop; blocking writes run on the transfer threads):
- `send_kv`: pins the source pages, waits at most the bootstrap timeout for the room's
  Bootstrap, checks the layouts agree and the page counts match, writes the KV as one
  descriptor per run of pages adjacent on both sides, then sends TransferDone with the aux data
  (carried through even if the send is cancelled meanwhile). Through a backend with
  notifications (NIXL) a successful room's TransferDone is a notification sent by the thread
  that saw the write land (notifications.py), preceded, while the write is in flight and the
  aux data known, by the same report marked `in_flight`; errors, and other backends, use the
  RPC. A send that ends before its Bootstrap came makes kvd refuse that Bootstrap later: the
  decode side fails at once.
- `on_handshake` / `on_bootstrap` / `on_cancel_room`: the decode kvds' side of it. A peer may
  only fill a room it was told about by the kvd it handshook with, and only the pages bound to
  that room; a cancelled room is refused from then on, and the cancel returns once a write in
  flight has ended.
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
Whatever happens (success, error, timeout, cancellation), the send unpins its pages on the way
out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from services.common import cudart
from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd.backends.base import TransferError
from services.kvd.backends.local_backend import LocalBackend, PreparedCopy, QueuedCopy
from services.kvd.backends.nixl_backend import PostedWrite, PreparedWrite
from services.kvd.metrics import failure_reason
from services.kvd.notifications import Notice, notifies
from services.kvd.peers import Peer
from services.kvd.pools import Pool, PoolLayout, check_page_ids, coalesce
from services.kvd.receiving import Receiver
from services.kvd.rooms import RoomError, RoomFlow, backend_error
from services.kvd.source_events import Claim, SourceEvents, SourceNotReady
from services.kvd.transfer import TransferJob, TransferQueues, timed_write, until_done

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _KnownPeer:
    address: str
    handle: str  # backend peer handle


class Sender(RoomFlow):
    """The rooms this kvd sends for its local prefill workers (constructed with `RoomFlow`'s
    arguments and this kvd's `Receiver`)."""

    def __init__(self, *args: Any, receiver: Receiver, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receiver = receiver  # this kvd's decode side: same-node rooms are told in process
        self.queues = TransferQueues(self.settings.thread_pool_size, self.settings.queue_size)
        self.source_events = SourceEvents()  # prefill workers' events, opened here
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
                recv = self.receiver.room(req.room)  # kept until this send ends (_drain waits)
                # a worker polling a ready flag has it set the moment the copy is done
                on_copied = (partial(self.receiver.landed_now, req.room)
                             if recv is not None and recv.accepts_ready_flag else None)
                landing = loop.run_in_executor(None, issued.wait, on_copied)
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
                    raise backend_error(req.room, e) from None
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
                recv = self.receiver.room(room)
                if recv is None or not recv.accepts_ready_event:
                    return None
                return job.backend.prepare_async(job.peer, job.src, job.dst_addrs)
            prepare = getattr(job.backend, "prepare_write", None)
            if not ahead or prepare is None:
                return None
            return prepare(job.peer, job.src, job.dst_addrs)
        except TransferError as e:
            raise backend_error(room, e) from None

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
            raise backend_error(room, e) from None

    async def _answer_queued(self, room: str, done: kvd_pb2.TransferDoneRequest,
                             queued: QueuedCopy, aux: asyncio.Future[kvd_pb2.RoomAux] | None
                             ) -> None:
        """Answer the decode side with the ready event of the queued copy, as soon as the aux
        data is known (the prefill side is answered once the copy is done)."""
        if aux is not None:
            done.aux.CopyFrom(await self._await_aux(room, aux))
        try:
            self.receiver.on_transfer_done(done, ready_event=queued.ready_event, via="in_process")
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
            raise backend_error(room, e) from None

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
            self.receiver.on_transfer_done(done, via="in_process")
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

    def release(self, name: str) -> bool:
        """The local decode worker gave up on a room whose bootstrap this kvd waits for (a
        same-node room): refuse it. False if none waits."""
        boot = self._bootstraps.get(name)
        if boot is None:
            return False
        if not boot.done():
            boot.cancel()
        return True


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
        return backend_error(room, e)
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
