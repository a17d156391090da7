"""How calls and outputs cross between `EngineLoop`'s thread and asyncio (engine_loop.py).

Contract:
- An asyncio object is touched only on its own event loop: from the loop thread, only through
  `loop.call_soon_threadsafe` (an event loop already closed is skipped: nobody is left to tell).
- `CommandQueue`: the `Command`s into the loop thread, in order, closed once. `put` from any
  thread queues a command, or refuses (False) once closed: no command enters after the stop
  marker that `close()` queues. The loop thread takes them with `get`, and at its end with
  `close_and_drain()`.
- `Command`: a call into the engine; `future` is its caller's (None: nobody waits). The loop
  thread runs `fn(engine)` and gives `answer()` the result or error: set on the caller's event
  loop, unless the caller was cancelled meanwhile.
- `Stream`: one request's outputs, from the loop thread (`put`, or `put_all` for many: one hop
  per event loop, not per item) to its consumer, who awaits `next()` on its own event loop until
  `is_done` (the finishing output or an error was taken); `kv_computed` calls the consumer's
  `on_kv_computed` on that event loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.engine.kv_events import KvComputed
from services.engine.output import RequestOutput

if TYPE_CHECKING:
    from services.engine.engine import LLMEngine


@dataclass(slots=True)
class Command:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any] | None = None  # None: nobody waits (fire and forget)

    def answer(self, result: Any = None, error: BaseException | None = None) -> None:
        """From the loop thread: `result`, or `error`, to the caller's event loop (nothing if
        nobody waits, or the caller was cancelled meanwhile)."""
        if self.future is not None:
            _call_soon(self.future.get_loop(), _settle, self.future, result, error)


class CommandQueue:
    """The loop thread's commands: FIFO, from any thread; closed once."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command | None] = queue.SimpleQueue()  # None: stop
        self._lock = threading.Lock()  # no command enters the queue after the stop marker
        self.is_closed = False

    def put(self, command: Command) -> bool:
        """Queue `command`; False (not queued) once closed."""
        with self._lock:
            if self.is_closed:
                return False
            self._queue.put(command)
            return True

    def close(self) -> None:
        """Refuse commands from now on and queue the stop marker (once)."""
        with self._lock:
            if not self.is_closed:
                self.is_closed = True
                self._queue.put(None)

    def get(self, wait_s: float) -> Command | None:
        """The next command, None at the stop marker; waits up to `wait_s` (0: not at all),
        then raises `queue.Empty`."""
        return self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()

    def close_and_drain(self) -> list[Command]:
        """Close (the loop thread is leaving: no stop marker) and take the commands left."""
        with self._lock:
            self.is_closed = True
        left: list[Command] = []
        while True:
            try:
                command = self._queue.get_nowait()
            except queue.Empty:
                return left
            if command is not None:
                left.append(command)


class Stream:
    """One request's outputs, from the loop thread to its consumer's event loop."""

    __slots__ = ("loop", "queue", "is_done", "on_kv_computed")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_kv_computed: Callable[[KvComputed], None] | None = None) -> None:
        self.loop = loop
        self.on_kv_computed = on_kv_computed
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.is_done = False  # consumer side: the finishing output or an error was taken

    async def next(self) -> RequestOutput:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.is_done = True
            raise item
        self.is_done = item.finished
        return item

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the loop thread: `item` onto the queue, on the consumer's event loop."""
        _call_soon(self.loop, _put_now, [(self, item)])

    def kv_computed(self, notice: KvComputed) -> None:
        """From the loop thread: `on_kv_computed(notice)`, if given, on the consumer's event
        loop (ahead of the outputs put after it)."""
        if self.on_kv_computed is not None:
            _call_soon(self.loop, self.on_kv_computed, notice)


Delivery = tuple[Stream, RequestOutput | BaseException]  # an item for a stream


def put_all(items: Iterable[Delivery]) -> None:
    """From the loop thread: each item onto its stream, one thread-safe call per event loop."""
    batches: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
    for stream, item in items:
        batches.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in batches.items():
        _call_soon(loop, _put_now, batch)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that event loop is closed: nobody is left to tell
        pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_now(items: list[Delivery]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)
