"""`EngineLoop`: one `LLMEngine` on a dedicated thread, bridged to asyncio.

Contract:
- The engine is single-threaded. Every call into it runs on the loop thread, as a command taken
  from one FIFO queue; asyncio callers `await` the result. Results and outputs cross back only
  through `loop.call_soon_threadsafe`, so asyncio objects are touched on their own event loop
  (loop_bridge.py: the command queue, per-request streams).
- The thread drains the queue, then steps the engine while `has_work()`; idle, it blocks on the
  queue (with a timeout) and never spins — unless the engine `awaits_landing()` (engine.py: a
  request gated on kvd's ready flag, or parked pages): then it blocks at most LANDING_POLL_S
  (the thread's timer slack is fine: timer_slack.py) and calls `poll_landings()` between
  waits, so a landing is seen within tens of microseconds, not at the next command.
- Each request added here has a stream (an asyncio.Queue of `RequestOutput` deltas) from
  admission to its finishing output. Its consumer owns the request:
    `generate(...)`          yields deltas until the finishing one;
    `add_remote_prefill(...)` reserves pages (decode side of PD); `kv_arrived(...)` puts the first
                             output on the stream; `remote_stream(rid)` yields it, then the deltas.
                             A caller that gives up before streaming calls `abort(rid)`.
  Closing a stream early (break, task cancelled, an exception) aborts the request and frees its
  pages. With `generate(keep_kv=True)` the finishing output carries `kv_page_ids`; those pages
  are then the caller's until `release_kv(rid)` (a consumer that leaves before taking that
  output leaves nothing held: the loop releases them). `on_kv_computed`, if given, is called on
  the caller's event loop before that output, as soon as the prompt's KV is queued on the GPU
  (engine.py's `KvComputed`); an engine that cannot tell that moment never calls it.
- A gated request whose landing fails (the KV transfer failed after its first output went out):
  its consumer gets `KvLandingFailed`; the engine has already freed its pages.
- A step that raises fails every live request: its consumer gets `EngineStepError`, the engine
  aborts it (pages freed), the error is logged, and the loop keeps serving new requests.
- `stop()` aborts what is left (consumers get `EngineStopped`) and joins the thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from services.common.ready_flags import Landing
from services.common.timer_slack import use_fine_timer_slack
from services.engine.engine import LLMEngine
from services.engine.kv_events import KvComputed
from services.engine.loop_bridge import Command, CommandQueue, Stream, put_all
from services.engine.output import RequestOutput
from services.engine.sampler import TokenLogprobs
from services.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_WAIT_S = 1.0  # an idle thread blocks this long on the queue before looking again
LANDING_POLL_S = 20e-6  # ... or this long, while the engine awaits a landing


class EngineLoopError(RuntimeError):
    """The request could not go on because of the engine loop, not because of its input."""


class EngineStepError(EngineLoopError):
    """An engine step raised; every request live at that moment was failed and aborted."""


class EngineStopped(EngineLoopError):
    """The loop is stopped or stopping; it takes no more requests."""


class KvLandingFailed(EngineLoopError):
    """kvd's ready flag said the request's KV will never land (after its first token was
    sent); the request was removed and its pages freed."""


class EngineLoad(NamedTuple):
    num_running: int  # in the running batch
    num_waiting: int  # queued for admission
    num_free_pages: int  # free or evictable
    num_pages: int  # pool size


class EngineLoop:
    def __init__(self, engine: LLMEngine, name: str = "engine-loop") -> None:
        self.engine = engine
        self._commands = CommandQueue()
        self._streams: dict[str, Stream] = {}  # loop thread only: requests with a consumer
        self._held: dict[str, Stream] = {}  # loop thread only: finished keep_kv requests
        self._unclaimed: dict[str, Stream] = {}  # event loop only: remote, not yet streamed
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        engine.on_kv_computed = self._on_kv_computed

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every request left, stop the thread and wait for it (blocking; from asyncio
        call it through `asyncio.to_thread`)."""
        self._commands.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("engine loop thread did not stop within %.1f s", timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._commands.is_closed

    # --- asyncio API -----------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams, keep_kv: bool = False,
                       on_kv_computed: Callable[[KvComputed], None] | None = None
                       ) -> AsyncGenerator[RequestOutput, None]:
        """Deltas until the finishing one. Input errors (`EngineInputError`) raise from the
        first `__anext__`; closing early aborts the request. `on_kv_computed`: see the
        module doc (keep_kv only)."""
        stream = Stream(asyncio.get_running_loop(), on_kv_computed)
        try:
            await self._call(functools.partial(self._on_add, request_id, list(prompt_token_ids),
                                               params, keep_kv, stream))
            while not stream.is_done:
                yield await stream.next()
        finally:
            if not stream.is_done:
                self._post(functools.partial(self._on_abort, request_id, stream))

    async def add_remote_prefill(self, request_id: str, prompt_token_ids: Sequence[int],
                                 params: SamplingParams) -> list[int] | None:
        """Decode side of PD: page ids reserved for the prompt's KV (token order), or None when
        the pool cannot hold it now. Then `kv_arrived` + `remote_stream`, or `abort`."""
        stream = Stream(asyncio.get_running_loop())
        try:
            page_ids = await self._call(functools.partial(
                self._on_add_remote, request_id, list(prompt_token_ids), params, stream))
        except asyncio.CancelledError:
            self._post(functools.partial(self._on_abort, request_id, stream))
            raise
        if page_ids is not None:
            self._unclaimed[request_id] = stream
        return page_ids

    async def kv_arrived(self, request_id: str, first_token_id: int,
                         logprobs: TokenLogprobs | None = None,
                         num_cached_tokens: int = 0, ready: Any = None,
                         landing: Landing | None = None) -> RequestOutput:
        """The KV landed (or lands when `ready`, a torch.cuda.Event, completes, and `landing`
        polls LANDED): the request decodes from then on. Returns the first output, which is also
        the first item of `remote_stream(request_id)`; a failed landing ends that stream with
        `KvLandingFailed`. KeyError if the request is unknown."""
        return await self._call(functools.partial(self._on_kv_arrived, request_id,
                                                  first_token_id, logprobs, num_cached_tokens,
                                                  ready, landing))

    async def remote_stream(self, request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """The outputs of a request added by `add_remote_prefill` (one consumer; KeyError from
        the first `__anext__` otherwise); closing early aborts it."""
        stream = self._unclaimed.pop(request_id, None)
        if stream is None:
            raise KeyError(f"no remote prefill {request_id!r} waiting to be streamed")
        try:
            while not stream.is_done:
                yield await stream.next()
        finally:
            if not stream.is_done:
                self._post(functools.partial(self._on_abort, request_id, stream))

    async def release_kv(self, request_id: str) -> bool:
        """Prefill side of PD: free the pages a finished keep_kv request still holds."""
        return await self._call(functools.partial(self._on_release_kv, request_id))

    async def abort(self, request_id: str) -> bool:
        """End a request wherever it is; its consumer gets the "abort" finishing output.
        False if it was not live."""
        self._unclaimed.pop(request_id, None)
        return await self._call(functools.partial(self._on_abort, request_id, None))

    async def load(self) -> EngineLoad:
        return await self._call(self._on_load)

    async def run_on_engine_thread(self, fn: Callable[[LLMEngine], T]) -> T:
        """`fn(engine)` between two steps, on the engine's own thread — for what must happen
        there (the torch profiler records the thread that starts it)."""
        return await self._call(fn)

    # --- crossing threads ------------------------------------------------------------------

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if not self._commands.put(Command(fn, future)):
            raise EngineStopped("the engine loop is stopped")
        return await future

    def _post(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Queue a command nobody waits for; dropped once stopped (stop aborts everything)."""
        self._commands.put(Command(fn))

    # --- the loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine.use_device()
            use_fine_timer_slack()
            while self._serve_commands():
                if self.engine.has_work():
                    self._step()
                elif self.engine.awaits_landing():
                    self._fail_landings(self.engine.poll_landings())
        except Exception:
            logger.exception("engine loop crashed")
        finally:
            self._shut_down()

    def _serve_commands(self) -> bool:
        """Run the queued commands (waiting for one when idle, briefly while the engine awaits a
        landing); False at the stop marker."""
        block = not self.engine.has_work()
        wait_s = LANDING_POLL_S if self.engine.awaits_landing() else IDLE_WAIT_S
        while True:
            try:
                command = self._commands.get(wait_s if block else 0)
            except queue.Empty:
                return True
            if command is None:
                return False
            self._execute(command)
            block = False

    def _execute(self, command: Command) -> None:
        try:
            result = command.fn(self.engine)
        except Exception as e:
            if command.future is None:
                logger.exception("engine command failed")
            command.answer(error=e)
            return
        command.answer(result)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._fail_landings(self.engine.take_failed_landings())
            logger.exception("engine step failed; failing %d live request(s)", len(self._streams))
            message = f"the engine step failed: {e!r}"
            self._fail_all(lambda: EngineStepError(message))
            return
        self._fail_landings(self.engine.take_failed_landings())
        self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Outputs to their streams: one thread-safe call per event loop, not per output."""
        items = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # added to the engine directly, not through this loop
                continue
            if output.finished:
                del self._streams[output.request_id]
                if output.kv_page_ids is not None:
                    self._held[output.request_id] = stream
            items.append((stream, output))
        put_all(items)

    def _on_kv_computed(self, notice: KvComputed) -> None:
        """The engine's hook (mid-step): on to the request's consumer, ahead of its outputs."""
        stream = self._streams.get(notice.request_id)
        if stream is not None:
            stream.kv_computed(notice)

    def _fail_landings(self, request_ids: list[str]) -> None:
        """Requests the engine removed because their KV never landed: tell their consumers."""
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                error = KvLandingFailed(
                    f"request {request_id!r}: the KV transfer failed after the first token was "
                    f"sent (the node's kvd log says why)")
                stream.put(error)

    def _fail_all(self, make_error: Callable[[], BaseException]) -> None:
        streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            stream.put(make_error())

    def _shut_down(self) -> None:
        for command in self._commands.close_and_drain():
            command.answer(error=EngineStopped("the engine loop stopped"))
        self._fail_all(lambda: EngineStopped("the engine loop stopped"))

    # --- commands (run on the loop thread) -------------------------------------------------

    def _on_add(self, request_id: str, prompt: list[int], params: SamplingParams, keep_kv: bool,
                stream: Stream, engine: LLMEngine) -> None:
        engine.add_request(request_id, prompt, params, keep_kv=keep_kv)
        self._streams[request_id] = stream

    def _on_add_remote(self, request_id: str, prompt: list[int], params: SamplingParams,
                       stream: Stream, engine: LLMEngine) -> list[int] | None:
        page_ids = engine.add_remote_prefill(request_id, prompt, params)
        if page_ids is not None:
            self._streams[request_id] = stream
        return page_ids

    def _on_kv_arrived(self, request_id: str, first_token_id: int,
                       logprobs: TokenLogprobs | None, num_cached_tokens: int, ready: Any,
                       landing: Landing | None, engine: LLMEngine) -> RequestOutput:
        output = engine.kv_arrived(request_id, first_token_id, logprobs, num_cached_tokens,
                                   ready, landing)
        self._dispatch([output])
        return output

    def _on_abort(self, request_id: str, owner: Stream | None, engine: LLMEngine) -> bool:
        """Abort `request_id`; with `owner`, only while that stream still owns it (a finished
        request's id may already belong to a new one)."""
        stream = self._streams.get(request_id)
        if owner is not None and stream is not owner:
            if self._held.get(request_id) is not owner:
                return False
            # finished with keep_kv, but its consumer left before seeing `kv_page_ids`
            del self._held[request_id]
            return engine.release_kv(request_id)
        self._held.pop(request_id, None)
        output = engine.abort(request_id)
        if stream is not None:
            del self._streams[request_id]
            if output is not None:
                stream.put(output)
        return output is not None

    def _on_release_kv(self, request_id: str, engine: LLMEngine) -> bool:
        self._held.pop(request_id, None)
        return engine.release_kv(request_id)

    def _on_load(self, engine: LLMEngine) -> EngineLoad:
        return EngineLoad(len(engine.scheduler.running), len(engine.scheduler.waiting),
                          engine.kv.num_free_pages, engine.kv.num_pages)

