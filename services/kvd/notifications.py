"""TransferDone as a transfer-backend notification instead of a gRPC call (NIXL).

A prefill kvd that has written a room's KV through NIXL tells the decode kvd over the same
NIXL connection: the notification leaves from the thread that saw the write land, with the
room's aux data (first token) in it, and needs neither the prefill kvd's event loop nor a
gRPC round trip (DESIGN.md: "then a notification carrying the aux data"). Errors, and
backends without notifications, still go by the TransferDone RPC.

Contract.
- A notification's message is `PREFIX` + a serialized `TransferDoneRequest` (never an error:
  those go by RPC). `encode` / `decode` make and read it; `decode` raises ValueError on
  anything else. `POSTED` + a room's name says that room's write has just been posted.
- Prefill side, `Notice`: the loop calls `set_aux(done)` once the aux data is known; the thread
  that posts the write calls `posted()`; the thread that sees it land calls `send()`, which
  sends the TransferDone if the aux data was known by then and returns whether it did. If it
  did not, or the backend refused, the loop tells the decode side itself. While the write is
  in flight with the aux data known, the decode side gets it early, once: the same
  TransferDone with `in_flight` set (instead of `POSTED`, from `posted()`, or from `set_aux`
  when the aux data comes after the post), so that it can answer a worker that polls a ready
  flag (services/common/ready_flags.py) before the bytes land.
- Decode side, `NotificationListener(backend, deliver, on_landed)`: while at least one room waits
  (`expect(fine)` / `forget(fine)` around each), a thread of its own polls
  `backend.notifications()` and hands each (sending agent, message) to `deliver` on the event
  loop that first called `expect()`; a `POSTED` one only changes the pace (an `in_flight` one
  does both). A notification for a room nobody waits for any more is delivered too
  (`deliver` drops it). Each landing TransferDone also goes to `on_landed(room, sender)` on
  the listening thread, before the loop hears of it: the decode kvd sets the ready flag of a
  room answered early there, if the sender is the room's prefill agent (receiving.py).
  `close()` stops the thread.

Polling cost and latency. A poll every 25 us cost ~45% of a core on a 2-core VM (sleeping and
waking, mostly) and slowed kvd's own CPU transfers there (0.96x -> 0.87x of the backend
alone); polling only every 500 us made a NIXL room between two H100s 0.1-0.6 ms later (a GPU
write takes ~1.4 ms, a one-page write far less). So the pace depends on what waits: while a
room into a GPU pool (`expect(fine=True)`; a GPU host has cores to spare) waits, POLL_S;
otherwise IDLE_POLL_S (~6% of a core on that VM) until a write is posted, then POLL_S, the
pause growing with the time since the last `POSTED` (1/64 of it, back to IDLE_POLL_S): a
300 ms host-memory write over TCP is seen ~1.5% late, one shorter than the idle pause up to
IDLE_POLL_S late.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeGuard

from services.common.proto.tandem.v1 import kvd_pb2
from services.common.timer_slack import use_fine_timer_slack

logger = logging.getLogger(__name__)

PREFIX = b"tandem-kvd-transfer-done:"
POSTED = b"tandem-kvd-posted:"
POLL_S = 25e-6  # the pause between polls while a write is in flight (fine timer slack)
IDLE_POLL_S = 500e-6  # the pause while rooms wait but no write was posted lately


class NotifyingBackend(Protocol):
    def notify(self, peer: str, message: bytes) -> None: ...

    def notifications(self) -> list[tuple[str, bytes]]: ...


def encode(done: kvd_pb2.TransferDoneRequest) -> bytes:
    if done.error:
        raise ValueError("a failed room's TransferDone goes by RPC, not by notification")
    return PREFIX + done.SerializeToString()


def decode(message: bytes) -> kvd_pb2.TransferDoneRequest:
    if not message.startswith(PREFIX):
        raise ValueError(f"not a kvd TransferDone notification: {message[:32]!r}")
    done = kvd_pb2.TransferDoneRequest()
    try:
        done.ParseFromString(message[len(PREFIX):])
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"a malformed TransferDone notification: {e}") from None
    if not done.room or done.error:
        raise ValueError("a TransferDone notification must name a room and carry no error")
    return done


def notifies(backend: object) -> TypeGuard[NotifyingBackend]:
    """Whether `backend` can carry TransferDone as a notification."""
    return callable(getattr(backend, "notify", None)) and callable(
        getattr(backend, "notifications", None))


class Notice:
    """One room's TransferDone notification, sent from the transfer thread (see the module
    doc). `message` is set on the loop (`set_aux`), once the aux data is known."""

    def __init__(self, backend: NotifyingBackend, peer: str, room: str) -> None:
        self._backend = backend
        self._peer = peer
        self._posted = POSTED + room.encode()
        self._lock = threading.Lock()  # orders set_aux against posted / send (other threads)
        self._early: bytes | None = None  # the in-flight TransferDone
        self._is_posted = False
        self._has_landed = False
        self.message: bytes | None = None

    def set_aux(self, done: kvd_pb2.TransferDoneRequest) -> None:
        """The room's TransferDone, aux data in it (on the loop). Sends it early now if the
        write is in flight."""
        early = kvd_pb2.TransferDoneRequest()
        early.CopyFrom(done)
        early.in_flight = True
        with self._lock:
            self.message = encode(done)
            self._early = encode(early)
            now = self._is_posted and not self._has_landed
        if now:
            self._quietly(self._early)

    def posted(self) -> None:
        """Tell the decode side the write is in flight, with the aux data if known (best
        effort: it then only polls slower, or answers its worker later)."""
        with self._lock:
            self._is_posted = True
            message = self._early or self._posted
        self._quietly(message)

    def _quietly(self, message: bytes) -> None:
        try:
            self._backend.notify(self._peer, message)
        except Exception as e:  # noqa: BLE001
            logger.debug("in-flight notification to %s failed: %s", self._peer, e)

    def send(self) -> bool:
        with self._lock:
            self._has_landed = True
            message = self.message
        if message is None:
            return False
        try:
            self._backend.notify(self._peer, message)
        except Exception as e:  # noqa: BLE001 - the loop falls back to the RPC
            logger.warning("TransferDone notification to %s failed, sending it by RPC: %s",
                           self._peer, e)
            return False
        return True


class NotificationListener:
    def __init__(self, backend: NotifyingBackend, deliver: Callable[[str, bytes], None],
                 on_landed: Callable[[str, str], None] | None = None) -> None:
        self._backend = backend
        self._deliver = deliver
        self._on_landed = on_landed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._waiting = 0  # rooms expecting a notification (_lock)
        self._fine = 0  # of which into GPU pools: polled POLL_S apart
        self._wanted = threading.Event()  # set while _waiting > 0, or closing
        self._closing = False
        self._thread: threading.Thread | None = None

    def expect(self, fine: bool = False) -> None:
        """A room now waits (on the event loop); `fine`: into a GPU pool."""
        with self._lock:
            self._waiting += 1
            self._fine += fine
            self._wanted.set()
            if self._thread is None and not self._closing:
                self._loop = asyncio.get_running_loop()
                self._thread = threading.Thread(target=self._poll, name="kvd-notifications",
                                                daemon=True)
                self._thread.start()

    def forget(self, fine: bool = False) -> None:
        """A room that `expect(fine)`ed no longer waits."""
        with self._lock:
            self._waiting -= 1
            self._fine -= fine
            if self._waiting <= 0 and not self._closing:
                self._wanted.clear()

    def _look_early(self, sender: str, message: bytes) -> bool:
        """The poll thread's own look at `message`, before the event loop delivers it: a
        landing goes to `on_landed` at once; returns whether the message says a write is still
        in flight (which keeps the poll fast)."""
        try:
            done = decode(message)
        except ValueError:
            return False  # the loop logs and drops it
        if done.in_flight:
            return True
        if self._on_landed is not None:
            try:
                self._on_landed(done.room, sender)
            except Exception:  # noqa: BLE001 - the loop settles the room anyway
                logger.exception("the landing of room %s failed to be taken early", done.room)
        return False

    def _poll(self) -> None:
        use_fine_timer_slack()
        loop = self._loop
        assert loop is not None
        posted_at = -1e9  # when a POSTED last came
        while True:
            self._wanted.wait()
            if self._closing:
                return
            try:
                received = self._backend.notifications()
            except Exception:  # noqa: BLE001 - keep listening; rooms still time out
                logger.exception("reading transfer notifications failed")
                received = []
            now = time.monotonic()
            for sender, message in received:
                if message.startswith(POSTED):
                    posted_at = now
                    continue
                if self._look_early(sender, message):
                    posted_at = now
                try:
                    loop.call_soon_threadsafe(self._deliver, sender, message)
                except RuntimeError:  # the loop is closed: kvd is stopping
                    return
            time.sleep(POLL_S if self._fine > 0 else pause(now - posted_at))

    def close(self, timeout: float = 1.0) -> None:
        with self._lock:
            self._closing = True
            self._wanted.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


def pause(since_posted: float) -> float:
    """The listener's pause before its next poll, `since_posted` seconds after the last
    POSTED (see the module doc)."""
    return min(max(since_posted / 64, POLL_S), IDLE_POLL_S)
