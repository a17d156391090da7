"""The gateway's HTTP API (Starlette): OpenAI's chat and text completions, models, health, metrics.

Contract:
- `POST /v1/chat/completions`, `POST /v1/completions`: OpenAI bodies (see `protocol`), answered
  whole or as server-sent events (`data: {chunk}` ... `data: [DONE]`). A stream's status and
  headers are sent with its first token, so a request that fails before producing anything gets
  its real status (400, 404, 503, ...) rather than a 200 stream holding an error; a failure
  after that is one `data: {"error": ...}` event before `[DONE]`.
- `GET /v1/models`, `GET /v1/models/{id}`: the models every role can serve now.
- `POST /start_profile`, `POST /stop_profile`: the torch profiler on chosen workers (see
  `profiling`).
- `GET /health`: 200 when every role has a worker in rotation, else 503 naming the role;
  `GET /liveness`: 200 while the process runs; `GET /metrics`: Prometheus text.
- Every error is `{"error": {"message", "type", "param", "code"}}`. With an API key, `/v1/*`
  and the profiling endpoints need `Authorization: Bearer KEY` (401 otherwise).
- A client that disconnects cancels its request's legs on every worker (streaming or not).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import tracing
from services.common.proto.tandem.v1 import worker_pb2
from services.gateway import profiling, spans
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.protocol import (
    Job,
    check_model,
    default_max_tokens,
    parse_chat,
    parse_completion,
)
from services.gateway.responses import Choice, ChunkWriter, full_response, usage
from services.gateway.router import Router

logger = logging.getLogger(__name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() \
        + b"\n\n"


class _Timing:
    """TTFT and inter-token latencies of one job, into the metrics."""

    def __init__(self, metrics: GatewayMetrics, n_choices: int) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first: float | None = None
        self.last = [0.0] * n_choices

    def tokens(self, index: int, r: worker_pb2.GenerateResponse) -> None:
        if not r.token_ids:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.start)
        elif self.last[index]:
            self.metrics.itl.observe(now - self.last[index])
        self.last[index] = now


_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})
_ADMIN = frozenset({"/start_profile", "/stop_profile"})  # need the API key too


class _AuthAndCount:
    """ASGI middleware for /v1/* and the profiling endpoints: the API key check, and requests
    counted by endpoint and status. Plain ASGI: Starlette's BaseHTTPMiddleware costs about a
    millisecond a request."""

    def __init__(self, app, api_key: str | None, metrics: GatewayMetrics) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path in _ADMIN):
            await self.app(scope, receive, send)
            return
        endpoint = path if path in _ENDPOINTS or path in _ADMIN else (
            "/v1/models/{id}" if path.startswith("/v1/models/") else "/v1/other")
        if self.expected is not None:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(
                    b"Bearer " + token.strip(), self.expected):
                self.metrics.requests.labels(endpoint, "401").inc()
                error = APIError(401, "Incorrect or missing API key: send "
                                 "`Authorization: Bearer <key>`", code="invalid_api_key")
                await _error_response(error)(scope, receive, send)
                return

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def build_app(router: Router, metrics: GatewayMetrics, api_key: str | None = None,
              max_payload_bytes: int = 256 * 1024 * 1024) -> Starlette:
    """Plain Starlette routes: FastAPI's per-request dependency solving costs time on the hot
    path and buys nothing here (bodies are validated by `protocol`)."""

    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(error.status_code, str(error.detail)))

    async def _body(request: Request) -> object:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_payload_bytes:
            raise APIError(413, f"the body is larger than {max_payload_bytes} bytes")
        raw = await request.body()
        if len(raw) > max_payload_bytes:
            raise APIError(413, f"the body is larger than {max_payload_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None

    def _prepare(job: Job) -> Job:
        served = router.models()
        if not served and router.unready_roles():
            raise _not_ready(router)
        check_model(job, served)
        if job.kind == "chat":
            default_max_tokens(job, served[job.model].max_model_len)
        return job

    async def chat_completions(request: Request) -> Response:
        job = _prepare(parse_chat(await _body(request)))
        return await _answer(request, job, "/v1/chat/completions")

    async def completions(request: Request) -> Response:
        job = _prepare(parse_completion(await _body(request)))
        return await _answer(request, job, "/v1/completions")

    async def _answer(request: Request, job: Job, endpoint: str) -> Response:
        span = spans.request_span("gateway.request", request.headers, {
            "http.route": endpoint, "gen_ai.request.model": job.model,
            "tandem.request_id": job.id, "tandem.choices": len(job.requests),
            "tandem.stream": job.stream})
        try:
            response = await _respond(request, job, endpoint, span)
        except BaseException as e:
            tracing.end_span(span, e)
            raise
        if not job.stream or response.status_code != 200:
            tracing.end_span(span, None, **{"http.status_code": response.status_code})
        return response

    async def _respond(request: Request, job: Job, endpoint: str, span) -> Response:
        timing = _Timing(metrics, len(job.requests))
        choices = [Choice(i) for i in range(len(job.requests))]
        events = _merged(router, job, span)
        if not job.stream:
            async def collect() -> dict:
                async with contextlib.aclosing(events):
                    async for index, r in events:
                        timing.tokens(index, r)
                        choices[index].add(r)
                return full_response(job, choices)
            body = await _cancel_on_disconnect(request, collect(), metrics)
            if body is _GONE:
                return Response(status_code=499)
            _finish(metrics, endpoint, timing, job, choices)
            return JSONResponse(body)
        # streaming: wait for the first response so that early failures keep their status
        try:
            first = await _cancel_on_disconnect(request, anext(events, None), metrics)
        except BaseException:
            await events.aclose()
            raise
        if first is _GONE:
            await events.aclose()
            return Response(status_code=499)
        stream = _stream(job, events, first, choices, timing, metrics, endpoint, span)
        return StreamingResponse(stream, media_type="text/event-stream", headers=_SSE_HEADERS)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            _model_card(name, info) for name, info in router.models().items()]})

    async def model(request: Request) -> JSONResponse:
        model_id = request.path_params["model_id"]
        served = router.models()
        if model_id not in served:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(_model_card(model_id, served[model_id]))

    async def health(request: Request) -> JSONResponse:
        if router.unready_roles():
            raise _not_ready(router)
        return JSONResponse({"status": "ok", "roles": {r: len(router.groups[r].healthy())
                                                        for r in router.roles}})

    async def liveness(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.exposition(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def start_profile(request: Request) -> JSONResponse:
        return await profiling.start_profile(request, router)

    async def stop_profile(request: Request) -> JSONResponse:
        return await profiling.stop_profile(request, router)

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models), Route("/v1/models/{model_id:path}", model),
              Route("/health", health), Route("/liveness", liveness),
              Route("/metrics", prometheus),
              Route("/start_profile", start_profile, methods=["POST"]),
              Route("/stop_profile", stop_profile, methods=["POST"])]
    # Starlette types every handler as taking any Exception; it calls each one only with the
    # class it is registered for
    return Starlette(routes=routes,
                     middleware=[Middleware(_AuthAndCount, api_key=api_key, metrics=metrics)],
                     exception_handlers={
                         APIError: _api_error,  # type: ignore[dict-item]
                         StarletteHTTPException: _http_error,  # type: ignore[dict-item]
                     })


def _not_ready(router: Router) -> APIError:
    roles = ", ".join(router.unready_roles())
    return APIError(503, f"no healthy worker for role(s): {roles}", code="no_healthy_worker")


def _model_card(name: str, info: worker_pb2.ModelInfoResponse) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tandem",
            "max_model_len": info.max_model_len}


def _finish(metrics: GatewayMetrics, endpoint: str, timing: _Timing, job: Job,
            choices: list[Choice]) -> None:
    """Token counts as the response's `usage` states them (each prompt once)."""
    metrics.e2e.labels(endpoint).observe(time.monotonic() - timing.start)
    counts = usage(choices, job.n)
    metrics.completion_tokens.inc(counts["completion_tokens"])
    metrics.prompt_tokens.inc(counts["prompt_tokens"])


async def _merged(router: Router, job: Job, span=None
                  ) -> AsyncGenerator[tuple[int, worker_pb2.GenerateResponse], None]:
    """(choice index, response) from all of the job's requests as they arrive. Closing it
    cancels every request still running."""
    if len(job.requests) == 1:
        stream = router.stream(job.requests[0], job.model, job.routing_texts[0], span)
        async with contextlib.aclosing(stream):
            async for r in stream:
                yield 0, r
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        stream = router.stream(job.requests[index], job.model, job.routing_texts[index],
                               span)
        try:
            async with contextlib.aclosing(stream):
                async for r in stream:
                    await queue.put((index, r, None))
            await queue.put((index, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, None, e))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(job.requests))]
    try:
        running = len(tasks)
        while running:
            index, r, error = await queue.get()
            if error is not None:
                raise error
            if r is None:
                running -= 1
                continue
            yield index, r
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stream(job: Job, events: AsyncGenerator[tuple[int, worker_pb2.GenerateResponse], None],
                  first: tuple | None, choices: list[Choice], timing: _Timing,
                  metrics: GatewayMetrics, endpoint: str, span=None
                  ) -> AsyncGenerator[bytes, None]:
    writer = ChunkWriter(job)
    opened: set[int] = set()
    finished = False
    error: BaseException | None = None
    try:
        async with contextlib.aclosing(events):
            pending = first
            while pending is not None:
                index, r = pending
                timing.tokens(index, r)
                choices[index].add(r)
                if index not in opened:
                    opened.add(index)
                    opening = writer.opening(index)
                    if opening is not None:
                        yield _sse(opening)
                yield _sse(writer.delta(choices[index], r, choices))
                pending = await anext(events, None)
        if job.include_usage:
            yield _sse(writer.final_usage(choices))
        finished = True
    except APIError as e:
        logger.warning("%s failed mid-stream: %s", job.id, e.message)
        error = e
        yield _sse(e.body())
        finished = True
    finally:
        if finished:
            _finish(metrics, endpoint, timing, job, choices)
        else:
            metrics.cancellations.inc()
        tracing.end_span(span, error if finished else asyncio.CancelledError("client went away"),
                  **{"http.status_code": 200, "gen_ai.usage.output_tokens":
                     sum(c.completion_tokens for c in choices)})
    yield b"data: [DONE]\n\n"


_GONE = object()  # the client disconnected


async def _cancel_on_disconnect(request: Request, work, metrics: GatewayMetrics):
    """Await `work`; `_GONE` if the client disconnected first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            metrics.cancellations.inc()
            with contextlib.suppress(BaseException):
                await task
            return _GONE
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
