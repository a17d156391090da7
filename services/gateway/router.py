"""Routing one generation to workers: unified (one worker) or PD (a prefill/decode pair).

Contract of `Router.stream(request, model, routing_text)`: an async iterator of the decode
stream's `GenerateResponse`s; every failure is an `APIError`.
- PD: picks a prefill and a decode worker with the role's policy, creates the room id, starts
  both legs at once (decode `Generate` with the prefill kvd's address, prefill `Prefill` with
  the decode kvd's address) and streams the decode leg.
- Retries: until the first response has been yielded, a failed attempt (either leg, any status
  but the client's own INVALID_ARGUMENT/OUT_OF_RANGE) is cancelled on both legs and retried on
  another pair, excluding the workers that failed, at most `max_retries` times. A worker whose
  leg ended UNAVAILABLE is checked at once and leaves rotation if the check fails too.
- Once a response was yielded, a failure ends the stream with its APIError (no retry: the
  client already has tokens).
- Closing the iterator early (the client went away) cancels both legs; the workers abort the
  request and free its pages. No healthy candidate: 503 naming the role.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from functools import partial

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry.trace import Span

from services.common import tracing
from services.common.proto.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.gateway import spans
from services.gateway.errors import CLIENT_FAULT_CODES, APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.policies import Policy
from services.gateway.workers import Worker, WorkerGroup

logger = logging.getLogger(__name__)

BLAME_WAIT_S = 1.0  # how long a failed decode leg waits to hear whether its prefill leg failed
_HEALTH_REQUEST = health_pb2.HealthCheckRequest()


class _AttemptFailed(Exception):
    """One attempt failed before the client saw anything; safe to retry elsewhere."""

    def __init__(self, error: APIError, worker: Worker, role: str, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.worker = worker
        self.role = role
        self.reason = reason


class Router:
    def __init__(self, groups: dict[str, WorkerGroup], policies: dict[str, Policy],
                 metrics: GatewayMetrics, *, pd: bool, request_timeout_s: float,
                 max_retries: int, check_timeout_s: float) -> None:
        self.groups = groups
        self.policies = policies
        self.metrics = metrics
        self.pd = pd
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.check_timeout_s = check_timeout_s
        for role, group in groups.items():
            for worker in group.workers:
                worker.on_removed = partial(self._forget, role)

    def _forget(self, role: str, worker: Worker) -> None:
        self.policies[role].forget(worker.url)
        self.metrics.worker_removed(role)

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.pd else ("worker",)

    def models(self) -> dict[str, worker_pb2.ModelInfoResponse]:
        """Models every role can serve now (PD: both a prefill and a decode worker have it)."""
        per_role = [self.groups[r].models() for r in self.roles]
        return {name: info for name, info in per_role[0].items()
                if all(name in other for other in per_role[1:])}

    def unready_roles(self) -> list[str]:
        return [r for r in self.roles if not self.groups[r].healthy()]

    async def stream(self, request: worker_pb2.GenerateRequest, model: str,
                     routing_text: str, span: Span | None = None
                     ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        """`span`: the request's trace span, if traced; attempts become its children."""
        deadline = time.monotonic() + self.request_timeout_s
        excluded: set[str] = set()
        attempt = 0
        while True:
            picked = self._pick(model, routing_text, excluded)
            for w in picked:
                w.in_flight += 1
            yielded = False
            attempt_span = spans.attempt_spans(span, attempt, picked, self.policies)
            error: BaseException | None = None
            try:
                this = _attempt_request(request, attempt)
                legs = (self._pd_attempt(this, picked[0], picked[1], deadline, attempt_span)
                        if self.pd else
                        self._unified_attempt(this, picked[0], deadline, attempt_span))
                async with contextlib.aclosing(legs) as responses:
                    async for response in responses:
                        yielded = True
                        yield response
                return
            except BaseException as e:
                error = e
                if not isinstance(e, _AttemptFailed):
                    raise
                failed = e
                if yielded:  # defensive: attempts raise _AttemptFailed only before a yield
                    raise failed.error from None
                excluded.add(failed.worker.url)
                attempt += 1
                self.metrics.retry(failed.role, failed.reason)
                if attempt > self.max_retries:
                    raise failed.error from None
                logger.warning("request %s: %s; retrying on another pair (%d/%d)",
                               request.request_id, failed.error.message, attempt,
                               self.max_retries)
            finally:
                for w in picked:
                    w.in_flight -= 1
                tracing.end_span(attempt_span, error)

    def _pick(self, model: str, text: str, excluded: set[str]) -> list[Worker]:
        picked = []
        for role in self.roles:
            candidates = [w for w in self.groups[role].candidates(model) if w.url not in excluded]
            if not candidates:
                raise self._no_candidate(role, model, excluded)
            picked.append(self.policies[role].choose(candidates, text))
        return picked

    def _no_candidate(self, role: str, model: str, excluded: set[str]) -> APIError:
        group = self.groups[role]
        name = {"worker": "worker", "prefill": "prefill worker", "decode": "decode worker"}[role]
        if not group.healthy():
            reasons = "; ".join(f"{w.url}: {w.last_error}" for w in group.workers)
            return APIError(503, f"no healthy {name} ({reasons})", code="no_healthy_worker")
        if excluded:
            return APIError(503, f"every healthy {name} failed this request",
                            code="no_healthy_worker")
        return APIError(404, f"no {name} serves model {model!r}", code="model_not_found")

    # ---- attempts ----

    async def _unified_attempt(self, request: worker_pb2.GenerateRequest, worker: Worker,
                               deadline: float, span: Span | None = None
                               ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        assert isinstance(worker.stub, worker_pb2_grpc.GenerateServiceStub)  # role "worker"
        call = worker.stub.Generate(request, timeout=_remaining(deadline),
                                    metadata=tracing.metadata_for(span))
        try:
            first = await self._read(call, worker, "worker", first=True)
            if first is None:
                return
            yield first
            while (response := await self._read(call, worker, "worker")) is not None:
                yield response
        finally:
            call.cancel()

    async def _pd_attempt(self, request: worker_pb2.GenerateRequest, prefill: Worker,
                          decode: Worker, deadline: float, span: Span | None = None
                          ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        room = uuid.uuid4().hex
        if span is not None:
            span.set_attribute("tandem.room", room)
        decode_req = with_room(request, room, prefill.kvd_peer_address)
        prefill_req = with_room(request, room, decode.kvd_peer_address)
        timeout = _remaining(deadline)
        metadata = tracing.metadata_for(span)
        assert isinstance(decode.stub, worker_pb2_grpc.GenerateServiceStub)
        assert isinstance(prefill.stub, worker_pb2_grpc.PrefillServiceStub)
        decode_call = decode.stub.Generate(decode_req, timeout=timeout, metadata=metadata)
        prefill_call = prefill.stub.Prefill(worker_pb2.PrefillRequest(request=prefill_req),
                                            timeout=timeout, metadata=metadata)
        prefill_task = asyncio.ensure_future(self._prefill_leg(prefill_call, prefill))
        first_task = asyncio.ensure_future(self._read(decode_call, decode, "decode", first=True))
        try:
            done, _ = await asyncio.wait({prefill_task, first_task},
                                         return_when=asyncio.FIRST_COMPLETED)
            if first_task not in done and (prefill_error := prefill_task.exception()) is not None:
                raise prefill_error  # the prefill leg failed: no KV will come
            try:
                first = await first_task
            except _AttemptFailed as failed:
                raise await self._blame(failed, prefill_task) from None
            if first is None:
                return
            yield first
            while (response := await self._read(decode_call, decode, "decode")) is not None:
                yield response
        finally:
            decode_call.cancel()
            prefill_call.cancel()
            for task in (prefill_task, first_task):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _blame(self, failed: _AttemptFailed,
                     prefill_task: asyncio.Future) -> _AttemptFailed | APIError:
        """The decode leg failed first. A live decode worker whose room failed usually means the
        prefill side died (its kvd stopped answering): if the prefill leg fails too within a
        moment, that is the failure to report and the worker to avoid."""
        if not failed.worker.healthy:
            return failed
        with contextlib.suppress(TimeoutError, _AttemptFailed, APIError):
            await asyncio.wait_for(asyncio.shield(prefill_task), BLAME_WAIT_S)
        if prefill_task.done() and not prefill_task.cancelled():
            error = prefill_task.exception()
            if isinstance(error, _AttemptFailed | APIError):
                return error
        return failed

    async def _prefill_leg(self, call, worker: Worker) -> worker_pb2.PrefillResponse:
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            raise await self._failure(e, worker, "prefill") from None
        self.metrics.kv_transfer(response)
        return response

    async def _read(self, call, worker: Worker, role: str,
                    first: bool = False) -> worker_pb2.GenerateResponse | None:
        """The next response, None at the end. Before the first one, failures may retry."""
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as e:
            failure = await self._failure(e, worker, role)
            if first or isinstance(failure, APIError):
                raise failure from None
            raise failure.error from None  # the client has tokens: no retry
        return None if response is grpc.aio.EOF else response

    async def _failure(self, e: grpc.aio.AioRpcError, worker: Worker,
                       role: str) -> _AttemptFailed | APIError:
        what = f"{role} worker {worker.url}"
        error = APIError.from_grpc(e, what)
        if e.code() in CLIENT_FAULT_CODES:
            return error
        if e.code() == grpc.StatusCode.CANCELLED:
            return error
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            await self._confirm_alive(worker, e.details() or "UNAVAILABLE")
        return _AttemptFailed(error, worker, role, e.code().name.lower())

    async def _confirm_alive(self, worker: Worker, reason: str) -> None:
        """An UNAVAILABLE leg may mean the worker is gone or only that its peer is: ask it."""
        try:
            await worker.health_stub.Check(_HEALTH_REQUEST, timeout=self.check_timeout_s)
        except grpc.aio.AioRpcError as e:
            worker.mark_failed(f"{reason}; health check: {e.code().name}")



def _attempt_request(request: worker_pb2.GenerateRequest,
                     attempt: int) -> worker_pb2.GenerateRequest:
    """A retry gets its own request id: the failed attempt may still be aborting under the old
    one on the same worker."""
    if attempt == 0:
        return request
    copy = worker_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = f"{request.request_id}.retry{attempt}"
    return copy


def with_room(request: worker_pb2.GenerateRequest, room: str,
              peer: str) -> worker_pb2.GenerateRequest:
    """One PD leg of `request`: a copy naming the room and the other side's kvd."""
    copy = worker_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.disaggregation.room = room
    copy.disaggregation.peer_kvd_address = peer
    return copy


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise APIError(504, "the request timed out (--request-timeout-secs)", code="timeout")
    return left
