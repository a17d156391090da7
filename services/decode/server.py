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
import inspect
import logging
import signal
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2_grpc

from services.common.proto.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.common.serve_config import ServeConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.engine_loop import EngineLoop, EngineStepError, EngineStopped
from services.engine.loader import LoadedModel, load_model
from services.engine.output import RequestOutput
from services.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0  # live streams get this long to finish after SIGTERM
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                      "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
                      "skip_special_tokens")
_FLOAT_SAMPLING = frozenset({"temperature", "top_p", "min_p", "presence_penalty",
                             "frequency_penalty", "repetition_penalty"})
_FINISH = {None: worker_pb2.FINISH_REASON_UNSPECIFIED, "stop": worker_pb2.FINISH_REASON_STOP,
           "length": worker_pb2.FINISH_REASON_LENGTH, "abort": worker_pb2.FINISH_REASON_ABORT}


def sampling_params_from_proto(proto: worker_pb2.SamplingParams) -> SamplingParams:
    """Absent optional fields take the defaults; floats lose their float32 noise (1.1, not
    1.100000023841858, in error messages). SamplingParamsError names the bad field."""
    values: dict[str, Any] = {name: getattr(proto, name) for name in _OPTIONAL_SAMPLING
                              if proto.HasField(name)}
    for name in _FLOAT_SAMPLING & values.keys():
        values[name] = float(f"{values[name]:.7g}")
    return SamplingParams.create(**values, stop=tuple(proto.stop),
                                 stop_token_ids=tuple(proto.stop_token_ids),
                                 ignore_eos=proto.ignore_eos)


def response_from_output(output: RequestOutput) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(
        token_ids=output.new_token_ids,
        text=output.new_text,
        logprobs=[worker_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                          top_token_ids=lp.top_token_ids,
                                          top_logprobs=lp.top_logprobs)
                  for lp in output.new_logprobs],
        finish_reason=_FINISH[output.finish_reason],
        usage=worker_pb2.Usage(prompt_tokens=output.num_prompt_tokens,
                               completion_tokens=output.num_output_tokens,
                               cached_tokens=output.num_cached_tokens),
    )


class GenerateServicer(worker_pb2_grpc.GenerateServiceServicer):
    def __init__(self, engine: EngineLoop, loaded: LoadedModel, config: ServeConfig) -> None:
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.model_name = config.served_model_name or loaded.name
        self.config = config
        self.live_request_ids: set[str] = set()  # streams open on this servicer

    async def Generate(self, request: worker_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self.live_request_ids:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request id {request_id!r} is already streaming")
        self.live_request_ids.add(request_id)
        try:
            try:
                self._check_request(request)
                prompt_ids = self._prompt_ids(request)
                params = sampling_params_from_proto(request.sampling)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            stream = self._prompt_stream(request_id, request, prompt_ids, params)
            async with contextlib.aclosing(stream):
                try:
                    async for output in stream:
                        yield response_from_output(output)
                except ValueError as e:  # input the engine refused (EngineInputError)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                except EngineStopped as e:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                except EngineStepError as e:
                    await context.abort(grpc.StatusCode.INTERNAL, str(e))
        finally:
            self.live_request_ids.discard(request_id)

    def _check_request(self, request: worker_pb2.GenerateRequest) -> None:
        """Mode-specific checks; ValueError becomes INVALID_ARGUMENT."""
        if request.HasField("disaggregation"):
            raise ValueError("this worker runs in null mode (unified prefill and decode); "
                             "a request with `disaggregation` needs a decode worker")

    def _prompt_stream(self, request_id: str, request: worker_pb2.GenerateRequest,
                       prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs; closing it early must abort the request."""
        return self.engine.generate(request_id, prompt_ids, params)

    def _prompt_ids(self, request: worker_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            return self.tokenizer.encode(request.text, add_special_tokens=True)
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            return self.tokenizer.encode_chat(
                messages, add_generation_prompt=request.chat.add_generation_prompt)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        raise ValueError("the request has no input: set one of text, chat, token_ids")

    async def GetLoad(self, request: worker_pb2.LoadRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.LoadResponse:
        load = await self.engine.load()
        return worker_pb2.LoadResponse(num_running=load.num_running,
                                       num_waiting=load.num_waiting,
                                       num_free_pages=load.num_free_pages,
                                       num_pages=load.num_pages)

    async def GetModelInfo(self, request: worker_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> worker_pb2.ModelInfoResponse:
        engine = self.engine.engine
        return worker_pb2.ModelInfoResponse(
            model_name=self.model_name, max_model_len=engine.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            disaggregation_mode=self.config.disaggregation_mode, kvd_peer_address="")


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Unexpected exceptions from any handler: traceback logged, INTERNAL answered."""

    async def intercept_service(self, continuation: Callable[..., Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


async def _answer_internal(context: grpc.aio.ServicerContext, method: str) -> None:
    logger.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (see worker log)")


def _guard_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _answer_internal(context, method)

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _answer_internal(context, method)

    return guarded


def resolve_device(config: ServeConfig) -> str:
    """`--device auto` and `--base-gpu-id` against the hardware that is really here."""
    has_cuda = torch.cuda.is_available()
    kind = ("cuda" if has_cuda else "cpu") if config.device == "auto" else config.device
    if kind == "cuda":
        if not has_cuda:
            raise ValueError("--device cuda: no CUDA device is available on this machine")
        count = torch.cuda.device_count()
        if config.base_gpu_id >= count:
            raise ValueError(f"--base-gpu-id {config.base_gpu_id}: this machine has {count} "
                             "GPU(s)")
        return f"cuda:{config.base_gpu_id}"
    if config.base_gpu_id != 0:
        logger.warning("--base-gpu-id %d has no effect: running on cpu (%s)", config.base_gpu_id,
                       "no GPU here" if not has_cuda else "--device cpu")
    if config.mem_fraction_static is not None:
        logger.warning("--mem-fraction-static has no effect on cpu; --num-kv-pages sizes the "
                       "KV pool")
    return "cpu"


class Worker:
    """The model, its engine loop and the gRPC server, from start to drained stop."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        device = resolve_device(config)
        self.loaded = load_model(config.model_path, device=device)
        engine = LLMEngine(self.loaded.model, self.loaded.tokenizer, EngineConfig(
            page_size=config.page_size, num_pages=config.num_kv_pages,
            mem_fraction_static=config.mem_fraction_static,
            max_running_requests=config.max_running_requests,
            chunked_prefill_size=config.chunked_prefill_size,
            enable_prefix_cache=not config.disable_prefix_cache,
            max_model_len=config.max_model_len, device=device))
        self.engine = EngineLoop(engine)
        logger.info("model %s on %s: %d KV pages of %d tokens, context %d", self.loaded.name,
                    device, engine.kv.num_pages, engine.kv.page_size, engine.max_model_len)

    def make_servicer(self) -> GenerateServicer:
        return GenerateServicer(self.engine, self.loaded, self.config)

    async def serve(self) -> int:
        """Serve until SIGTERM/SIGINT, then drain; the exit status."""
        config = self.config
        server = grpc.aio.server(interceptors=[ExceptionInterceptor()])
        servicer = self.make_servicer()
        health_servicer = health.aio.HealthServicer()
        worker_pb2_grpc.add_GenerateServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        host = f"[{config.host}]" if ":" in config.host else config.host
        try:
            port = server.add_insecure_port(f"{host}:{config.port}")
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"--host {config.host} --port {config.port}: cannot listen there "
                          "(port in use?)")
        self.engine.start()
        await server.start()
        print(f"serving {servicer.model_name} ({config.disaggregation_mode}) on "
              f"{config.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logger.info("shutting down: draining %d live request(s) for up to %.0f s",
                    len(servicer.live_request_ids), SHUTDOWN_GRACE_S)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(SHUTDOWN_GRACE_S)
        await asyncio.to_thread(self.engine.stop)
        logger.info("stopped")
        return 0
