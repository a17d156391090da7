"""The gateway's view of its workers: one gRPC channel each, health, load and model.

Contract:
- A `Worker` is in rotation (`healthy`) once it answered `health_success_threshold` checks in a
  row *and* its GetModelInfo is known; it leaves after `health_failure_threshold` failed checks,
  or at once when a request to it fails with UNAVAILABLE (the process is gone or refusing).
- `load` is what routing compares: requests this gateway has in flight there plus the running and
  waiting requests the worker last reported.
- `WorkerGroup.candidates(model)` lists the healthy workers serving `model`.
- `HealthChecker` polls every worker every interval (grpc.health.v1 Check, then GetLoad, and
  GetModelInfo until known) and logs each transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_errors import RECONNECT_OPTIONS
from services.common.proto.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.config import WorkerSpec

logger = logging.getLogger(__name__)

# generous message limits: prompts of token ids and many logprobs can be large
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 * 1024 * 1024),
                   ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.max_pings_without_data", 0),
                   # a restarted worker is back in rotation within seconds, not minutes
                   *RECONNECT_OPTIONS]

ROLES = ("prefill", "decode", "worker")
EXPECTED_MODE = {"prefill": "prefill", "decode": "decode", "worker": "null"}


class Worker:
    def __init__(self, spec: WorkerSpec, role: str) -> None:
        self.spec = spec
        self.url = spec.url
        self.role = role
        self.channel = grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS)
        # a prefill worker serves PrefillService, the others GenerateService
        self.stub: worker_pb2_grpc.PrefillServiceStub | worker_pb2_grpc.GenerateServiceStub
        if role == "prefill":
            self.stub = worker_pb2_grpc.PrefillServiceStub(self.channel)
        else:
            self.stub = worker_pb2_grpc.GenerateServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.info: worker_pb2.ModelInfoResponse | None = None
        self.healthy = False
        self.in_flight = 0
        self.reported_load = 0
        self.successes = 0
        self.failures = 0
        self.last_error = "not checked yet"
        self.on_removed: Callable[[Worker], None] = lambda w: None

    @property
    def load(self) -> float:
        return self.in_flight + self.reported_load

    @property
    def model_name(self) -> str | None:
        return self.info.model_name if self.info else None

    @property
    def kvd_peer_address(self) -> str:
        """Where the other side's kvd reaches this worker's kvd (PD roles only)."""
        address = self.info.kvd_peer_address if self.info else ""
        if self.spec.bootstrap_port is not None and address:
            address = f"{address.rsplit(':', 1)[0]}:{self.spec.bootstrap_port}"
        return address

    def mark_failed(self, reason: str) -> None:
        """A request saw the worker gone: out of rotation until checks pass again."""
        self.successes = 0
        self.last_error = reason
        if self.healthy:
            self.healthy = False
            logger.warning("%s worker %s out of rotation: %s", self.role, self.url, reason)
            self.on_removed(self)

    async def check(self, timeout: float, success_threshold: int,
                    failure_threshold: int) -> None:
        """One health check; updates `healthy` with the thresholds."""
        try:
            reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(),
                                                 timeout=timeout)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise _CheckFailed("not serving (draining or starting)")
            if self.info is None:
                info = await self.stub.GetModelInfo(worker_pb2.ModelInfoRequest(),
                                                    timeout=timeout)
                self._accept_info(info)
            load = await self.stub.GetLoad(worker_pb2.LoadRequest(), timeout=timeout)
            self.reported_load = load.num_running + load.num_waiting
        except (grpc.aio.AioRpcError, _CheckFailed, TimeoutError) as e:
            self._failed_check(_describe(e), failure_threshold)
            return
        self.failures = 0
        self.successes += 1
        if not self.healthy and self.successes >= success_threshold:
            self.healthy = True
            logger.info("%s worker %s in rotation (%s)", self.role, self.url, self.model_name)

    def _accept_info(self, info: worker_pb2.ModelInfoResponse) -> None:
        expected = EXPECTED_MODE[self.role]
        if info.disaggregation_mode != expected:
            raise _CheckFailed(f"it runs --disaggregation-mode {info.disaggregation_mode}, "
                               f"this gateway lists it as a {self.role} worker ({expected})")
        if self.role != "worker" and not info.kvd_peer_address:
            raise _CheckFailed("it reports no kvd peer address")
        self.info = info

    def _failed_check(self, reason: str, failure_threshold: int) -> None:
        self.successes = 0
        self.failures += 1
        if reason != self.last_error:
            logger.info("%s worker %s check failed: %s", self.role, self.url, reason)
        self.last_error = reason
        if self.healthy and self.failures >= failure_threshold:
            self.healthy = False
            logger.warning("%s worker %s out of rotation after %d failed checks: %s",
                           self.role, self.url, self.failures, reason)
            self.on_removed(self)

    async def close(self) -> None:
        await self.channel.close()


class _CheckFailed(Exception):
    pass


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e)


class WorkerGroup:
    """The workers of one role."""

    def __init__(self, role: str, specs: Iterable[WorkerSpec]) -> None:
        self.role = role
        self.workers = [Worker(s, role) for s in specs]

    def candidates(self, model: str) -> list[Worker]:
        return [w for w in self.workers if w.healthy and w.model_name == model]

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def models(self) -> dict[str, worker_pb2.ModelInfoResponse]:
        return {w.info.model_name: w.info for w in self.healthy() if w.info is not None}


class HealthChecker:
    def __init__(self, groups: Iterable[WorkerGroup], interval: float, timeout: float,
                 success_threshold: int, failure_threshold: int) -> None:
        self.workers = [w for g in groups for w in g.workers]
        self.interval = interval
        self.timeout = timeout
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self._task: asyncio.Task | None = None

    async def check_all(self) -> None:
        await asyncio.gather(*(w.check(self.timeout, self.success_threshold,
                                       self.failure_threshold) for w in self.workers))

    async def _run(self) -> None:
        # Until a worker is first in rotation, check it quickly: a stack started all at once
        # should serve as soon as its workers do, not one interval later.
        while True:
            started = time.monotonic()
            await self.check_all()
            pending = any(not w.healthy and w.info is None for w in self.workers)
            wait = min(self.interval, 0.25) if pending else self.interval
            await asyncio.sleep(max(0.0, wait - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
