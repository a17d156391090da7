"""The worker's gRPC server: GenerateService over an `EngineLoop`, plus grpc.health.v1.

Contract: the servicer converts protobuf to engine types at the boundary and answers each
failure with its status — bad input (prompt, ids, sampling fields, a `disaggregation` the mode
does not take) INVALID_ARGUMENT with the engine's message; a request id already streaming
ALREADY_EXISTS; the engine stopping UNAVAILABLE; a failed engine step INTERNAL. Anything else
is logged with its traceback by `ExceptionInterceptor` and answered INTERNAL. A client that
cancels its stream aborts its request: its pages are free before the next command runs.
Unified mode (`null`) streams `LLMEngine.generate`; a decode mode subclasses the servicer and
overrides `_check_request` and `_prompt_stream`. On SIGTERM/SIGINT health turns NOT_SERVING,
new RPCs are refused, live streams finish (up to `SHUTDOWN_GRACE_S`), then the engine stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from services.common import tracing
from services.common.convert import (
    load_to_proto,
    model_info_to_proto,
    prompt_ids_from_proto,
    response_from_output,
    sampling_params_from_proto,
)
from services.common.grpc_errors import SERVER_OPTIONS, ExceptionInterceptor
from services.common.grpc_server import bind, serve_until_signal
from services.common.kvd_client import RoomFailed
from services.common.metrics_http import start_metrics_server
from services.common.process import freeze_gc
from services.common.profiler import ProfilerServicer
from services.common.proto.tandem.v1 import profiler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.serve_config import ServeConfig
from services.common.worker_metrics import CANCELLED, WorkerMetrics
from services.engine.engine import LLMEngine
from services.engine.engine_loop import EngineLoop, EngineStepError, EngineStopped
from services.engine.loader import LoadedModel, load_model, resolve_dtype
from services.engine.output import RequestOutput
from services.engine.runtime import build_engine, resolve_device
from services.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0  # live streams get this long to finish after SIGTERM
class GenerateServicer(worker_pb2_grpc.GenerateServiceServicer):
    def __init__(self, engine: EngineLoop, loaded: LoadedModel, config: ServeConfig) -> None:
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.model_name = config.served_model_name or loaded.name
        self.config = config
        self.live_request_ids: set[str] = set()  # streams open on this servicer
        mode = config.disaggregation_mode
        self.metrics = WorkerMetrics("unified" if mode == "null" else mode, engine.engine)
        self.metrics_address = ""  # host:port of /metrics, once served

    async def Generate(self, request: worker_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.live_request_ids:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request id {request_id!r} is already streaming")
        self.live_request_ids.add(request_id)
        timer = self.metrics.request()
        span = tracing.start_span(f"{self.metrics.mode}.request", servicer_context=context,
                                  server=True, attributes={"tandem.request_id": request_id})
        error: BaseException | None = None
        tokens = 0
        try:
            try:
                self._check_request(request)
                prompt_ids = prompt_ids_from_proto(self.tokenizer, request)
                params = sampling_params_from_proto(request.sampling)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            stream = self._prompt_stream(request_id, request, prompt_ids, params, span)
            async with contextlib.aclosing(stream):
                try:
                    async for output in stream:
                        timer.output(output)
                        tokens = output.num_output_tokens
                        yield response_from_output(output, self.tokenizer)
                except ValueError as e:  # input the engine refused (EngineInputError)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except EngineStopped as e:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                except EngineStepError as e:
                    await context.abort(grpc.StatusCode.INTERNAL, str(e))
                except RoomFailed as e:
                    await context.abort(e.code, str(e))
        except (asyncio.CancelledError, GeneratorExit) as e:
            timer.fail(CANCELLED)
            error = e
            raise
        except BaseException as e:
            error = e
            raise
        finally:
            timer.fail()  # an error status, unless the request ended before
            self.live_request_ids.discard(request_id)
            tracing.end_span(span, error, **{"tandem.output_tokens": tokens})

    def _check_request(self, request: worker_pb2.GenerateRequest) -> None:
        """Mode-specific checks; ValueError becomes INVALID_ARGUMENT."""
        if request.HasField("disaggregation"):
            raise ValueError("this worker runs in null mode (unified prefill and decode); "
                             "a request with `disaggregation` needs a decode worker")

    def _prompt_stream(self, request_id: str, request: worker_pb2.GenerateRequest,
                       prompt_ids: list[int], params: SamplingParams, span=None
                       ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs; closing it early must abort the request. `span`: the
        request's trace span, if traced."""
        return self.engine.generate(request_id, prompt_ids, params)

    async def GetLoad(self, request: worker_pb2.LoadRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.LoadResponse:
        return load_to_proto(await self.engine.load())

    async def GetModelInfo(self, request: worker_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> worker_pb2.ModelInfoResponse:
        return model_info_to_proto(self.engine.engine, self.model_name,
                                   self.config.disaggregation_mode, self.kvd_peer_address,
                                   self.metrics_address)

    @property
    def kvd_peer_address(self) -> str:
        return ""  # null mode moves no KV


class Worker:
    """The model, its engine loop and the gRPC server, from start to drained stop.
    Modes that need more (kvd, another servicer) override `make_engine` / `make_servicer`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.device = resolve_device(config)
        self.loaded = load_model(config.model_path, device=self.device,
                                 dtype=resolve_dtype(config.dtype, self.device))
        self.engine: EngineLoop | None = None

    async def make_engine(self) -> LLMEngine:
        return build_engine(self.config, loaded=self.loaded)[1]

    def make_servicer(self, engine: EngineLoop) -> GenerateServicer:
        return GenerateServicer(engine, self.loaded, self.config)

    async def serve(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; the exit status."""
        config = self.config
        server = grpc.aio.server(interceptors=[ExceptionInterceptor()], options=SERVER_OPTIONS)
        engine = self.engine = EngineLoop(await self.make_engine())
        servicer = self.make_servicer(engine)
        health_servicer = health.aio.HealthServicer()
        worker_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        mode = "unified" if config.disaggregation_mode == "null" else config.disaggregation_mode
        profiler = ProfilerServicer(engine, mode, self.device)
        profiler_pb2_grpc.add_ProfilerServiceServicer_to_server(profiler, server)
        port = bind(server, config.host, config.port)
        profiler.name = f"{profiler.name}-{port}"  # its trace files' prefix
        servicer.metrics_address = start_metrics_server(
            servicer.metrics.registry, config.host, config.metrics_port, f"{mode} worker").address
        freeze_gc()  # the model and graphs are built: later collections skip them
        engine.start()
        banner = (f"serving {servicer.model_name} ({config.disaggregation_mode}) on "
                  f"{config.host}:{port}")
        return await serve_until_signal(
            server, health_servicer, banner, SHUTDOWN_GRACE_S,
            lambda: len(servicer.live_request_ids), lambda: asyncio.to_thread(self._stop, engine))

    def _stop(self, engine: EngineLoop) -> None:
        engine.stop()
        self.after_engine_stop()

    def after_engine_stop(self) -> None:
        """Release what the engine computed in, once it has stopped (decode mode: the mapping
        of kvd's KV pool)."""
