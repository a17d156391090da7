"""Decode mode: a request's prompt KV comes from a prefill worker, through the node's kvd.

Contract of `DecodeServicer._prompt_stream` for a request with `disaggregation` (room, the
prefill node's kvd address):
1. reserve pages for the prompt in the engine (waiting while the pool is full, at most
   SGLANG_DISAGGREGATION_WAITING_TIMEOUT);
2. ExpectKv: kvd binds those pages to the room, bootstraps the prefill side and waits for the
   KV and the first token (kvd enforces the waiting timeout and the heartbeats); with a VRAM
   pool the worker accepts a ready event, which kvd sends when the copy is only queued; with
   ready flags (services/common/ready_flags.py) it accepts an early answer while another
   kvd's write is in flight;
3. the engine continues from the first token (its GPU work waiting on the ready event, if
   any; decoding only once the ready flag says the KV landed) and streams the rest.
On any failure or cancellation the client gets its status at once (RoomFailed); the
request's pages are freed only after kvd's ReleaseRoom returns, i.e. once no late write from
the prefill side can land in them — or, for a room answered with a ready flag, once the flag
is final (the engine keeps them until then; a client that leaves first makes the worker
release the room, so that kvd settles the flag at once). A room that fails after its flag
was handed out ends the stream with UNAVAILABLE (KvLandingFailed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

import grpc

from services.common import tracing
from services.common.kvd_client import RoomFailed
from services.common.proto.tandem.v1 import kvd_pb2, worker_pb2
from services.common.ready_flags import LandingState
from services.common.serve_config import ServeConfig
from services.decode.server import GenerateServicer, Worker
from services.engine.engine import LLMEngine
from services.engine.engine_loop import EngineLoop, KvLandingFailed
from services.engine.loader import LoadedModel
from services.engine.output import RequestOutput
from services.engine.runtime import PDAttachment, build_pd_engine
from services.engine.sampler import TokenLogprobs
from services.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

RESERVE_POLL_S = 0.02


def waiting_timeout() -> float:
    return float(os.environ.get("SGLANG_DISAGGREGATION_WAITING_TIMEOUT") or 300.0)


class DecodeServicer(GenerateServicer):
    def __init__(self, engine: EngineLoop, loaded: LoadedModel, config: ServeConfig,
                 pd: PDAttachment) -> None:
        super().__init__(engine, loaded, config)
        self.pd = pd
        self._cleanups: set[asyncio.Task[None]] = set()

    @property
    def kvd_peer_address(self) -> str:
        return self.pd.peer_address

    def _check_request(self, request: worker_pb2.GenerateRequest) -> None:
        d = request.disaggregation
        if not d.room or not d.peer_kvd_address:
            raise ValueError("a decode worker needs `disaggregation`: the room and the "
                             "prefill node's kvd address (peer_kvd_address)")

    async def _prompt_stream(self, request_id: str, request: worker_pb2.GenerateRequest,
                             prompt_ids: list[int], params: SamplingParams, span=None
                             ) -> AsyncGenerator[RequestOutput, None]:
        room = request.disaggregation.room
        waiting = tracing.start_span("decode.wait_for_kv", span, attributes={"tandem.room": room})
        try:
            page_ids = await self._reserve(request_id, prompt_ids, params)
        except BaseException as e:
            tracing.end_span(waiting, e)
            raise
        tracing.set_attributes(waiting, **{"tandem.pages": len(page_ids)})
        try:
            reply = await self.pd.kvd.stub.ExpectKv(kvd_pb2.ExpectKvRequest(
                pool_id=self.pd.pool_id, room=room, page_ids=page_ids,
                peer_address=request.disaggregation.peer_kvd_address,
                accept_ready_event=self.pd.accepts_ready_event,
                accept_ready_flag=self.pd.accepts_ready_flag),
                metadata=tracing.metadata_for(waiting))
            aux = reply.aux
            logprobs = (TokenLogprobs(aux.first_token_id, aux.first_logprob,
                                      list(aux.top_token_ids), list(aux.top_logprobs))
                        if params.logprobs is not None else None)
            ready = self.pd.ready_event(reply.ready_event) if reply.ready_event else None
            landing = (self.pd.landing(reply.ready_flag) if reply.HasField("ready_flag")
                       else None)
            await self.engine.kv_arrived(request_id, aux.first_token_id, logprobs,
                                         aux.cached_tokens, ready, landing)
        except grpc.aio.AioRpcError as e:
            self._give_up(request_id, room)
            tracing.end_span(waiting, e)
            raise RoomFailed.from_rpc(room, e) from None
        except BaseException as e:
            self._give_up(request_id, room)
            tracing.end_span(waiting, e)
            raise
        tracing.end_span(waiting, None, **{"tandem.kv_bytes": reply.kv_bytes,
                                           "tandem.early": landing is not None})
        generating = tracing.start_span("decode.generate", span)
        error: BaseException | None = None
        tokens = 0
        try:
            async for output in self.engine.remote_stream(request_id):
                tokens = output.num_output_tokens
                yield output
        except KvLandingFailed as e:
            error = e
            raise RoomFailed(grpc.StatusCode.UNAVAILABLE, f"room {room!r}: {e}") from None
        except BaseException as e:
            error = e
            raise
        finally:
            tracing.end_span(generating, error, **{"tandem.output_tokens": tokens})
            if landing is not None and landing.poll() is LandingState.PENDING:
                # left before the KV landed: the engine keeps the pages until kvd settles the
                # flag, which the release makes it do now (cancelling the write)
                self._in_background(self._release(room))

    def _give_up(self, request_id: str, room: str) -> None:
        """Free the request's pages once kvd says no write into them can still land (a late
        write into pages reused by another request would corrupt it). In the background: the
        client gets its answer now."""
        self._in_background(self._release_then_abort(request_id, room))

    def _in_background(self, cleanup: Coroutine[Any, Any, None]) -> None:
        """Run `cleanup` after the request's answer, held until it ends."""
        task = asyncio.get_running_loop().create_task(cleanup)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _release(self, room: str) -> None:
        """ReleaseRoom: returns once no write into the room's pages can land any more."""
        try:
            await self.pd.kvd.stub.ReleaseRoom(kvd_pb2.ReleaseRoomRequest(room=room),
                                               timeout=waiting_timeout() + 10.0)
        except grpc.aio.AioRpcError as e:  # kvd gone: nothing can write into the pool now
            logger.warning("ReleaseRoom %s: %s", room, e.details())

    async def _release_then_abort(self, request_id: str, room: str) -> None:
        try:
            await self._release(room)
        finally:
            await self.engine.abort(request_id)

    async def _reserve(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> list[int]:
        deadline = time.monotonic() + waiting_timeout()
        while True:
            page_ids = await self.engine.add_remote_prefill(request_id, prompt_ids, params)
            if page_ids is not None:
                return page_ids
            if time.monotonic() > deadline:
                raise RoomFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"no KV pages for a {len(prompt_ids)}-token prompt within "
                                 f"{waiting_timeout():g}s: the decode pool is full")
            await asyncio.sleep(RESERVE_POLL_S)


class DecodeWorker(Worker):
    """A decode worker: its KV pool lives in the node's kvd."""

    pd: PDAttachment

    async def make_engine(self) -> LLMEngine:
        engine, self.pd = await build_pd_engine(self.config, self.loaded, self.device)
        return engine

    def make_servicer(self, engine: EngineLoop) -> GenerateServicer:
        return DecodeServicer(engine, self.loaded, self.config, self.pd)

    def after_engine_stop(self) -> None:
        self.pd.close()
