"""How a room's KV leaves this kvd, and how the decode side hears of it: the steps of one send
that `Sender._push` (sending.py) strings together, while the room flow around them (handshakes,
bootstraps, pins, cancellation) stays there.

Contract (`Delivery`'s coroutines on kvd's asyncio loop; `write` and `land` on other threads):
- Paths. Same node, GPU to GPU, for a decode worker that set `accept_ready_event`: `prepare`
  plans the copies, `issue` queues them (on the loop thread, bypassing the transfer queues),
  `answer_queued` answers the decode side at once (once the aux is known) with the CUDA IPC
  event that completes after them, `watch_copy` waits for them on a thread (setting a polled
  ready flag the moment they are done) and `landed` gives their seconds. (If a queued copy then
  fails, which takes a GPU fault, the decode side has already been told; kvd logs it and the
  send fails.) Every other transfer is one blocking `write` on a transfer thread, or, sent
  ahead through a backend that can prepare its write (NIXL), one prepared on the loop and
  posted by the thread that saw the source pages ready; `land` waits for it there.
- Sent ahead with a `source_ready_event` (VRAM pools only): `await_source` waits for the
  prefill's CUDA event on kvd's event-polling thread (source_events.py), which issues the
  prepared copy or write the moment the event completes; it gives up when the send is
  cancelled or the waiting timeout passes, and then nothing reads the pages any more.
- Telling. Through a backend with notifications (NIXL) a successful room's TransferDone is a
  `Notice` (notifications.py, from `notice`) sent by the thread that saw the write land,
  preceded, while the write is in flight and the aux data known, by the same report marked
  `in_flight`. Errors, and other backends, use `tell` / `notify`: in process when the decode
  side is this kvd, else the TransferDone RPC; `tell` carries it through even if the send is
  cancelled meanwhile. `await_aux` bounds the wait for aux data that comes later (SendKvAhead's
  first token) by the waiting timeout.
The caller owns the source pages' pins and unpins them only once whatever was issued is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc

from services.common import cudart
from services.common.proto.tandem.v1 import kvd_pb2
from services.kvd.backends.base import TransferBackend, TransferError
from services.kvd.backends.local_backend import LocalBackend, PreparedCopy, QueuedCopy
from services.kvd.backends.nixl_backend import PostedWrite, PreparedWrite
from services.kvd.config import TransferSettings
from services.kvd.notifications import Notice, notifies
from services.kvd.peers import Peer
from services.kvd.receiving import Receiver
from services.kvd.rooms import RoomError, backend_error
from services.kvd.source_events import Claim, SourceEvents, SourceNotReady
from services.kvd.transfer import TransferJob, timed_write, until_done

logger = logging.getLogger(__name__)


class Delivery:
    """The transfer steps of this kvd's sends (built by `Sender`, which owns the source
    events)."""

    def __init__(self, backend: TransferBackend, receiver: Receiver,
                 source_events: SourceEvents, settings: TransferSettings) -> None:
        self.backend = backend  # to other kvds: the one that may notify
        self.receiver = receiver  # this kvd's decode side: same-node rooms are told in process
        self.source_events = source_events
        self.settings = settings

    async def await_source(self, req: kvd_pb2.SendKvRequest, device: int,
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

    async def await_aux(self, room: str, aux: asyncio.Future[kvd_pb2.RoomAux]
                        ) -> kvd_pb2.RoomAux:
        timeout = self.settings.waiting_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(aux), timeout)
        except TimeoutError:
            raise RoomError("DEADLINE_EXCEEDED", f"room {room!r}: the prefill worker sent no "
                            f"first token within {timeout:g}s of its KV", "timeout") from None

    def prepare(self, room: str, job: TransferJob, ahead: bool
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

    def notice(self, handle: str, is_local: bool, done: kvd_pb2.TransferDoneRequest,
               aux: asyncio.Future[kvd_pb2.RoomAux] | None) -> Notice | None:
        """The room's TransferDone as a notification the transfer thread sends to backend peer
        `handle` (NIXL peers), its message set once the aux data is known; None where the RPC
        tells."""
        if is_local or not notifies(self.backend):
            return None
        notice = Notice(self.backend, handle, done.room)

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
    def issue(room: str, copy: PreparedCopy | PreparedWrite) -> QueuedCopy | PostedWrite:
        try:
            return copy.issue()
        except TransferError as e:
            raise backend_error(room, e) from None

    def watch_copy(self, room: str, queued: QueuedCopy) -> asyncio.Future[float]:
        """The queued copy's GPU seconds, waited for on a thread; the decode side's room (kept
        until this send ends: its drain waits) holds it as its `landing`, and a worker polling
        a ready flag has it set the moment the copy is done."""
        recv = self.receiver.room(room)
        on_copied = (partial(self.receiver.landed_now, room)
                     if recv is not None and recv.accepts_ready_flag else None)
        landing: asyncio.Future[Any] = asyncio.get_running_loop().run_in_executor(
            None, queued.wait, on_copied)
        if recv is not None:
            recv.landing = landing
        return landing

    async def answer_queued(self, room: str, done: kvd_pb2.TransferDoneRequest,
                            queued: QueuedCopy, aux: asyncio.Future[kvd_pb2.RoomAux] | None
                            ) -> None:
        """Answer the decode side with the ready event of the queued copy, as soon as the aux
        data is known (the prefill side is answered once the copy is done)."""
        if aux is not None:
            done.aux.CopyFrom(await self.await_aux(room, aux))
        try:
            self.receiver.on_transfer_done(done, ready_event=queued.ready_event, via="in_process")
        except RoomError as e:  # the decode side gave up while the aux was awaited
            raise RoomError("ABORTED", f"room {room!r}: the decode side did not take its KV: "
                            f"{e}", "notify_failed") from None
        await asyncio.sleep(0)  # let the woken ExpectKv answer first

    @staticmethod
    async def landed(room: str, landing: asyncio.Future[float]) -> float:
        """The queued copy's GPU seconds, once it is done (the decode side has been told)."""
        try:
            return await until_done(landing)
        except TransferError as e:
            logger.error("room %s: a queued GPU copy failed after the decode side was told it "
                         "would complete: %s", room, e)
            raise backend_error(room, e) from None

    async def tell(self, peer: Peer, done: kvd_pb2.TransferDoneRequest, is_local: bool,
                   raise_errors: bool = False) -> None:
        """`notify`, carried through even if this send is cancelled meanwhile (a prefill
        worker that goes away mid-notice): the decode side must hear of its room either way."""
        notice = asyncio.ensure_future(self.notify(peer, done, is_local, raise_errors))
        notice.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        await asyncio.shield(notice)

    async def notify(self, peer: Peer, done: kvd_pb2.TransferDoneRequest, is_local: bool,
                     raise_errors: bool = False) -> None:
        """TransferDone to the decode side: in-process when it is this kvd (`is_local`, the
        same-node path: saves a loopback RPC on the critical path), else over gRPC."""
        if not is_local:
            await _notify_by_rpc(peer, done, raise_errors)
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


def write(job: TransferJob, notice: Notice | None) -> float:
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


def land(wait: Callable[[], float], notice: Notice | None,
         tell_posted: bool = False) -> tuple[float, bool]:
    """On the thread that waits for a write (`tell_posted`: one posted by another thread,
    the decode side not yet told so — not from the event-polling thread, which has other
    rooms to watch): its seconds, and whether the decode side was told by notification the
    moment it landed."""
    if tell_posted and notice is not None:
        notice.posted()
    seconds = wait()
    return seconds, notice is not None and notice.send()


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


async def _notify_by_rpc(peer: Peer, done: kvd_pb2.TransferDoneRequest,
                         raise_errors: bool = False) -> None:
    try:
        await peer.stub.TransferDone(done, timeout=10.0)
    except grpc.aio.AioRpcError as e:
        logger.warning("TransferDone for room %s to %s failed: %s", done.room, peer.address,
                       e.details())
        if raise_errors:
            raise RoomError("UNAVAILABLE", f"room {done.room!r}: the decode side did not take "
                            f"the KV: {e.code().name}: {e.details()}", "notify_failed") from None
