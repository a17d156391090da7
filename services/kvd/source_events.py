"""The CUDA IPC events prefill workers send with their KV (`SendKvRequest.source_ready_event`).

A prefill worker may send a room before its GPU has finished computing the KV: it records an
interprocess event on its stream after the forward pass and names it in the request. kvd waits
for that event on the host, on a thread of its own, and only then reads the pages.

Why on the host, not with a stream waiting on the event: if the worker dies before its forward
pass ends, the event may never complete, and a kvd stream waiting on it would hold every later
copy queued behind it forever; a stream of another GPU waiting on an opened interprocess event
even crashed kvd (H100, driver 580.159.04, CUDA 13.0). A host wait can give up.

Contract: `wait(handle, device, claim, deadline, then=None)` (a concurrent Future, on this
object's threads; at most MAX_WAITS run at once, more queue) opens the event — once per handle
and device; at most `capacity` stay open, the least recently used one no wait is polling
destroyed first — polls it every POLL_S, and once its latest record has completed runs
`then()` on the waiting thread (kvd queues the room's copy there: no hop back to the event
loop before the bytes move) and resolves to its result (None without `then`). `claim`
decides between that and the caller abandoning the wait (its send was cancelled):
`claim.abandon()` returns whether `then` ran first (with its result: the caller must wait for
what it queued) — otherwise it never runs. The wait fails with `SourceNotReady` if abandoned or
the monotonic `deadline` passes first, `ValueError` for a handle CUDA refuses,
`cudart.CudaError` if CUDA fails the query, and with whatever `then` raises. `close()` ends
every wait and destroys the events (unless a thread is stuck in CUDA past `timeout`: those are
left to the process's exit).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from services.common import cudart

POLL_S = 50e-6  # between two queries of an event not yet complete (see _sleep_finely)
MAX_WAITS = 64  # threads; a room holds one for the rest of its prefill's forward pass
PR_SET_TIMERSLACK = 29  # prctl(2)
ABANDONED = "the send was abandoned before the prefill's KV was ready"


class SourceNotReady(Exception):
    """The wait ended without the event completing; the message says why."""


class Claim:
    """Who goes first for one wait: the waiting thread running `then` (the event completed) or
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


class SourceEvents:
    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._open: OrderedDict[tuple[int, bytes], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(MAX_WAITS, thread_name_prefix="kv-source",
                                           initializer=_sleep_finely)
        self._closing = threading.Event()
        self._active = 0  # waits running (guarded by _lock)
        self._polled: dict[tuple[int, bytes], int] = {}  # key -> waits polling it (_lock)

    def wait(self, handle: bytes, device: int, claim: Claim, deadline: float,
             then: Callable[[], Any] | None = None) -> Future[Any]:
        return self._threads.submit(self._wait, handle, device, claim, deadline, then)

    def _wait(self, handle: bytes, device: int, claim: Claim, deadline: float,
              then: Callable[[], Any] | None) -> Any:
        key = (device, handle)
        with self._lock:
            self._active += 1
        try:
            event = self._event(key)
            while not cudart.event_query(event):
                if claim.abandoned or self._closing.is_set():
                    raise SourceNotReady(ABANDONED)
                if time.monotonic() > deadline:
                    raise SourceNotReady("the prefill's forward pass did not finish in time")
                time.sleep(POLL_S)
            return claim.run(then)
        finally:
            with self._lock:
                self._active -= 1
                if key in self._polled:
                    self._polled[key] -= 1
                    if not self._polled[key]:
                        del self._polled[key]

    def _event(self, key: tuple[int, bytes]) -> Any:
        """The opened event, marked as polled (the caller unmarks it). Opened outside the lock:
        a CUDA call that may take a while must not hold up the other waits."""
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
        self._threads.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._active == 0:
                    events, self._open = list(self._open.values()), OrderedDict()
                    break
            if time.monotonic() > deadline:
                return  # a thread is stuck in CUDA: leave its event to the process's exit
            time.sleep(0.01)
        for event in events:
            cudart.event_destroy(event)


def _sleep_finely() -> None:
    """Let this thread's sleeps overshoot by ~1 us rather than Linux's default 50 us of timer
    slack: a poll's latency is what is left of its sleep (a 50 us sleep took 125 us -> 83 us on
    a 2-core VM)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
        except (OSError, AttributeError):
            pass
