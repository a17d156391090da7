"""The prefill worker's gRPC server: PrefillService over an `EngineLoop`, plus health.

Contract of `Prefill(request)` (request.disaggregation names the room and the decode node's
kvd): wait until the decode side has reserved the room's pages (its bootstrap reached this
node's kvd, at most SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT) — as SGLang's bootstrap queue, so
that no KV is computed without a destination; run the prompt through the engine for one token,
keeping its KV pages; send those pages to the room ahead (kv_sender.py: kvd has them as soon as
the forward pass is queued, and moves them the moment the GPU is done), then the first token as
aux data; answer once the KV has landed. The pages are released on every path — sent, failed,
timed out or cancelled — and a send already announced is cancelled on every failure.
Bad input is INVALID_ARGUMENT; a failed transfer answers the status kvd gave (RoomFailed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from services.common import tracing
from services.common.convert import (
    load_to_proto,
    logprob_to_proto,
    model_info_to_proto,
    prompt_ids_from_proto,
    sampling_params_from_proto,
)
from services.common.grpc_errors import SERVER_OPTIONS, ExceptionInterceptor
from services.common.grpc_server import bind, serve_until_signal
from services.common.kvd_client import RoomFailed
from services.common.metrics_http import start_metrics_server
from services.common.process import freeze_gc
from services.common.profiler import ProfilerServicer
from services.common.proto.tandem.v1 import kvd_pb2, profiler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.serve_config import ServeConfig
from services.common.worker_metrics import CANCELLED, SENT, RequestTimer, WorkerMetrics
from services.engine.engine_loop import EngineLoop, EngineStepError, EngineStopped
from services.engine.kv_events import KvComputed
from services.engine.loader import LoadedModel, load_model, resolve_dtype
from services.engine.output import RequestOutput
from services.engine.runtime import PDAttachment, build_pd_engine, resolve_device
from services.engine.sampling_params import SamplingParams
from services.prefill.kv_sender import AheadSend

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer):
    def __init__(self, engine: EngineLoop, loaded: LoadedModel, config: ServeConfig,
                 pd: PDAttachment) -> None:
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.model_name = config.served_model_name or loaded.name
        self.config = config
        self.pd = pd
        self.live_request_ids: set[str] = set()
        self.metrics = WorkerMetrics("prefill", engine.engine)
        self.metrics_address = ""  # host:port of /metrics, once served

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResponse:
        req = request.request
        request_id = req.request_id or uuid.uuid4().hex
        if request_id in self.live_request_ids:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request id {request_id!r} is already prefilling")
        self.live_request_ids.add(request_id)
        timer = self.metrics.request()
        try:
            with tracing.server_span("prefill.request", context,
                                     **{"tandem.request_id": request_id,
                                        "tandem.room": req.disaggregation.room}):
                response = await self._prefill(request_id, req, context, timer)
            timer.finish(SENT, response.prompt_tokens, 0)
            return response
        except asyncio.CancelledError:
            timer.fail(CANCELLED)
            raise
        finally:
            timer.fail()  # an error status, unless the KV was sent
            self.live_request_ids.discard(request_id)

    async def _prefill(self, request_id: str, req: worker_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext,
                       timer: RequestTimer) -> worker_pb2.PrefillResponse:
        d = req.disaggregation
        sender = AheadSend(self.pd.kvd.stub, self.pd.pool_id, d.room, d.peer_kvd_address)
        try:
            try:
                if not d.room or not d.peer_kvd_address:
                    raise ValueError("a prefill request needs `disaggregation`: the room and "
                                     "the decode node's kvd address (peer_kvd_address)")
                prompt_ids = prompt_ids_from_proto(self.tokenizer, req)
                params = sampling_params_from_proto(req.sampling)
                with tracing.span("prefill.queue", **{"tandem.room": d.room}):
                    await self._await_bootstrap(d.room)  # the bootstrap queue, as SGLang's
                start = time.perf_counter()
                with tracing.span("prefill.forward") as span:
                    first = await self._first_token(request_id, prompt_ids, params,
                                                    sender.announce)
                    tracing.set_attributes(span, **{
                        "tandem.prompt_tokens": first.num_prompt_tokens,
                        "tandem.cached_tokens": first.num_cached_tokens,
                        "tandem.kv_sent_ahead": sender.was_announced})
                timer.tokens_out()
                self.metrics.prefill_seconds.observe(time.perf_counter() - start)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except RoomFailed as e:
                await context.abort(e.code, str(e))
            except EngineStopped as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            except EngineStepError as e:
                await context.abort(grpc.StatusCode.INTERNAL, str(e))
            try:
                start = time.perf_counter()
                sent = await sender.finish(first)  # its kv.transfer span began at the announce
                self.metrics.kv_send_seconds.observe(time.perf_counter() - start)
                self.metrics.kv_sent_bytes.inc(sent.kv_bytes)
            except RoomFailed as e:
                await context.abort(e.code, str(e))
        finally:
            sender.cancel()  # nothing once finished; else kvd fails the room on both sides
            await asyncio.shield(self.engine.release_kv(request_id))
        lp = first.new_logprobs[0] if first.new_logprobs else None
        return worker_pb2.PrefillResponse(
            first_token_id=first.new_token_ids[0],
            first_logprob=logprob_to_proto(lp, self.tokenizer) if lp is not None else None,
            prompt_tokens=first.num_prompt_tokens, cached_tokens=first.num_cached_tokens,
            kv_bytes=sent.kv_bytes, transfer_seconds=sent.transfer_seconds,
            transfer_backend=sent.backend, num_descriptors=sent.num_descriptors,
        )

    async def _await_bootstrap(self, room: str) -> None:
        """Compute no KV before the decode side has reserved where it goes: KV waiting for a
        destination would hold this pool while decode pages wait for this pool (deadlock)."""
        try:
            await self.pd.kvd.stub.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(room=room),
                                                  metadata=tracing.grpc_metadata())
        except grpc.aio.AioRpcError as e:
            raise RoomFailed.from_rpc(room, e) from None

    async def _first_token(self, request_id: str, prompt_ids: list[int],
                           params: SamplingParams,
                           on_kv_computed: Callable[[KvComputed], None]) -> RequestOutput:
        """Prefill for one token; the finishing output carries the KV's page ids."""
        one = dataclasses.replace(params, max_tokens=1)
        stream = self.engine.generate(request_id, prompt_ids, one, keep_kv=True,
                                      on_kv_computed=on_kv_computed)
        async with contextlib.aclosing(stream):
            async for output in stream:
                if output.finished:
                    assert output.kv_page_ids is not None
                    return output
        raise EngineStopped(f"request {request_id!r} ended without a token")

    async def GetLoad(self, request: worker_pb2.LoadRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.LoadResponse:
        return load_to_proto(await self.engine.load())

    async def GetModelInfo(self, request: worker_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> worker_pb2.ModelInfoResponse:
        return model_info_to_proto(self.engine.engine, self.model_name, "prefill",
                                   self.pd.peer_address, self.metrics_address)


class PrefillWorker:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.device = resolve_device(config)
        self.loaded = load_model(config.model_path, device=self.device,
                                 dtype=resolve_dtype(config.dtype, self.device))

    async def serve(self) -> int:
        config = self.config
        engine_, pd = await build_pd_engine(config, self.loaded, self.device)
        engine = EngineLoop(engine_)
        server = grpc.aio.server(interceptors=[ExceptionInterceptor()], options=SERVER_OPTIONS)
        servicer = PrefillServicer(engine, self.loaded, config, pd)
        health_servicer = health.aio.HealthServicer()
        worker_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        profiler = ProfilerServicer(engine, "prefill", self.device)
        profiler_pb2_grpc.add_ProfilerServiceServicer_to_server(profiler, server)
        port = bind(server, config.host, config.port)
        profiler.name = f"{profiler.name}-{port}"  # its trace files' prefix
        servicer.metrics_address = start_metrics_server(
            servicer.metrics.registry, config.host, config.metrics_port, "prefill worker").address
        freeze_gc()  # the model and graphs are built: later collections skip them
        engine.start()
        banner = f"serving {servicer.model_name} (prefill) on {config.host}:{port}"

        def stop() -> None:
            engine.stop()
            pd.close()  # unmap a VRAM pool only once nothing computes in it

        return await serve_until_signal(
            server, health_servicer, banner, SHUTDOWN_GRACE_S,
            lambda: len(servicer.live_request_ids), lambda: asyncio.to_thread(stop))
