"""The CUDA IPC events prefill workers send with their KV (`SendKvRequest.source_ready_event`).

A prefill worker may send a room before its GPU has finished computing the KV: it records an
interprocess event on its stream after the forward pass and names it in the request. kvd waits
for that event on the host, on a thread of its own, and only then reads the pages.

Why on the host, not with a stream waiting on the event: if the worker dies before its forward
pass ends, the event may never complete, and a kvd stream waiting on it would hold every later
copy queued behind it forever; a stream of another GPU waiting on an opened interprocess event
even crashed kvd (H100, driver 580.159.04, CUDA 13.0). A host wait can give up.

One thread polls every pending wait, POLL_S apart, so that a batch of rooms announced at once
costs one thread's polling, not a thread each (each sleeping 50 us and taking the GIL to
wake); opening a handle, which may take a while, happens on a few other threads first.

Contract: `wait(handle, device, claim, deadline, then=None)` returns a concurrent Future. The
event is opened once per handle and device (at most `capacity` stay open; the least recently
used one no wait is polling is destroyed first) and polled; once its latest record has
completed, the polling thread runs `then()` (kvd queues the room's copy there: no hop back to
the event loop before the bytes move) and the Future resolves to its result (None without
`then`). `claim` decides between that and the caller abandoning the wait (its send was
cancelled): `claim.abandon()` returns whether `then` ran first (with its result: the caller
must wait for what it queued) — otherwise it never runs. The wait fails with `SourceNotReady`
if abandoned or the monotonic `deadline` passes first, `ValueError` for a handle CUDA refuses,
`cudart.CudaError` if CUDA fails the query, and with whatever `then` raises. `close()` ends
every wait and destroys the events (unless the polling thread is stuck in CUDA past
`timeout`: they are left to the process's exit).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.common import cudart
from services.common.timer_slack import use_fine_timer_slack

POLL_S = 50e-6  # between two rounds of queries (with fine timer slack)
OPENERS = 4  # threads opening handles
ABANDONED = "the send was abandoned before the prefill's KV was ready"


class SourceNotReady(Exception):
    """The wait ended without the event completing; the message says why."""


class Claim:
    """Who goes first for one wait: the polling thread running `then` (the event completed) or
    the caller abandoning it. Decided once, under a lock that `then` runs under."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._ran = False
        self._result: Any = None

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> tuple[bool, Any]:
        """(False, None): `then` has not run and never will. (True, its result — None if it
        raised): it ran first and has returned."""
        with self._lock:
            if self._ran:
                return True, self._result
            self._abandoned = True
            return False, None

    def run(self, then: Callable[[], Any] | None) -> Any:
        with self._lock:
            if self._abandoned:
                raise SourceNotReady(ABANDONED)
            try:
                self._result = then() if then is not None else None
            finally:
                self._ran = True
            return self._result


@dataclass(slots=True, eq=False)
class _Wait:
    key: tuple[int, bytes]
    event: Any
    claim: Claim
    deadline: float
    then: Callable[[], Any] | None
    future: Future[Any]


class SourceEvents:
    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._open: OrderedDict[tuple[int, bytes], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._polled: dict[tuple[int, bytes], int] = {}  # key -> waits polling it (_lock)
        self._waits: list[_Wait] = []  # being polled (_lock)
        self._added = threading.Event()  # a wait was added, or closing
        self._closing = threading.Event()
        self._openers = ThreadPoolExecutor(OPENERS, thread_name_prefix="kv-source-open")
        self._poller: threading.Thread | None = None  # started by the first wait

    def wait(self, handle: bytes, device: int, claim: Claim, deadline: float,
             then: Callable[[], Any] | None = None) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        try:
            self._openers.submit(self._start, (device, handle), claim, deadline, then, future)
        except RuntimeError:  # closed
            future.set_exception(SourceNotReady(ABANDONED))
        return future

    def _start(self, key: tuple[int, bytes], claim: Claim, deadline: float,
               then: Callable[[], Any] | None, future: Future[Any]) -> None:
        """On an opener thread: open the event, then hand the wait to the polling thread."""
        if self._closing.is_set():
            future.set_exception(SourceNotReady(ABANDONED))
            return
        try:
            event = self._event(key)
        except BaseException as e:  # noqa: BLE001 - the wait's outcome
            future.set_exception(e)
            return
        with self._lock:
            closing = self._closing.is_set()
            if not closing:
                self._waits.append(_Wait(key, event, claim, deadline, then, future))
                if self._poller is None:
                    self._poller = threading.Thread(target=self._poll, name="kv-source-poll",
                                                    daemon=True)
                    self._poller.start()
        if closing:
            self._finish(_Wait(key, event, claim, deadline, then, future),
                         error=SourceNotReady(ABANDONED))
            return
        self._added.set()

    def _poll(self) -> None:
        use_fine_timer_slack()
        while not self._closing.is_set():
            with self._lock:
                waits = list(self._waits)
            if not waits:
                self._added.wait()
                self._added.clear()
                continue
            now = time.monotonic()
            for w in waits:
                try:
                    if w.claim.abandoned:
                        self._finish(w, error=SourceNotReady(ABANDONED))
                    elif cudart.event_query(w.event):
                        self._finish(w, result=w.claim.run(w.then))
                    elif now > w.deadline:
                        self._finish(w, error=SourceNotReady(
                            "the prefill's forward pass did not finish in time"))
                except BaseException as e:  # noqa: BLE001 - the wait's outcome
                    self._finish(w, error=e)
            time.sleep(POLL_S)

    def _finish(self, w: _Wait, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            if w in self._waits:
                self._waits.remove(w)
            self._polled[w.key] -= 1
            if not self._polled[w.key]:
                del self._polled[w.key]
        if error is not None:
            w.future.set_exception(error)
        else:
            w.future.set_result(result)

    def _event(self, key: tuple[int, bytes]) -> Any:
        """The opened event, marked as polled (`_finish` unmarks it). Opened outside the lock:
        a CUDA call that may take a while must not hold up the polling."""
        with self._lock:
            event = self._open.get(key)
            if event is not None:
                self._open.move_to_end(key)
                self._polled[key] = self._polled.get(key, 0) + 1
                return event
        device, handle = key
        try:
            opened = cudart.ipc_event_open(device, handle)
        except cudart.CudaError as e:
            raise ValueError(f"source_ready_event is not an event kvd can open on its GPU "
                             f"{device}: {e}") from None
        evicted = []
        with self._lock:
            event = self._open.setdefault(key, opened)
            self._polled[key] = self._polled.get(key, 0) + 1
            idle = [k for k in self._open if k not in self._polled]  # oldest first
            for old in idle[:max(0, len(self._open) - self.capacity)]:
                evicted.append(self._open.pop(old))
        if event is not opened:  # another thread opened it meanwhile
            evicted.append(opened)
        for old_event in evicted:
            cudart.event_destroy(old_event)
        return event

    def __len__(self) -> int:
        return len(self._open)

    def close(self, timeout: float = 1.0) -> None:
        self._closing.set()
        self._added.set()
        self._openers.shutdown(wait=False)  # what is queued there fails at once
        with self._lock:
            poller = self._poller
        if poller is not None:
            poller.join(timeout)
            if poller.is_alive():
                return  # stuck in CUDA: leave the events to the process's exit
        with self._lock:
            waits, self._waits = self._waits, []
        for w in waits:
            self._finish(w, error=SourceNotReady(ABANDONED))
        with self._lock:
            events, self._open = list(self._open.values()), OrderedDict()
        for event in events:
            cudart.event_destroy(event)
