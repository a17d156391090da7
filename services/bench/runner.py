"""Drive a workload against a server: warmup, Poisson arrivals, a concurrency cap, progress.

Contract: `run_benchmark` sends the warmup requests (copies of the first request, all at once, not
measured), then every request of the workload, and returns one `RequestRecord` per request in
workload order, with the duration from the first arrival to the last completion. Request i becomes
due at `arrival_times(...)[i]`; with `max_concurrency` it then waits for a free slot, and its
`send_s`/TTFT count from the moment it is actually sent (SGLang's convention). The run owns its
`httpx.AsyncClient`: no connection limit beyond `max_concurrency`, no proxies from the
environment (a benchmark measures the server, not a proxy).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm  # type: ignore[import-untyped]

from services.bench.client import RequestRecord, StreamSettings, stream_request
from services.bench.workload import BenchRequest


@dataclass(frozen=True, slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    peak_concurrency: int          # most requests in flight at once
    warmup_errors: list[str]


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start: all 0 for an infinite rate, else a Poisson process (the first at
    0, then exponential gaps of mean 1 / request_rate)."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(request_rate)
    return times


def make_client(timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s),
                             limits=httpx.Limits(max_connections=None,
                                                 max_keepalive_connections=None),
                             trust_env=False)


async def _warmup(client: httpx.AsyncClient, settings: StreamSettings, request: BenchRequest,
                  num_requests: int) -> list[str]:
    origin = time.perf_counter()
    records = await asyncio.gather(*(stream_request(client, settings, request, -1, origin)
                                     for _ in range(num_requests)))
    return [r.error for r in records if r.error is not None]


async def run_benchmark(client: httpx.AsyncClient, settings: StreamSettings,
                        requests: list[BenchRequest], *, request_rate: float = math.inf,
                        max_concurrency: int | None = None, seed: int = 0,
                        warmup_requests: int = 0, show_progress: bool = False) -> RunResult:
    warmup_errors = []
    if warmup_requests and requests:
        warmup_errors = await _warmup(client, settings, requests[0], warmup_requests)
        if warmup_errors:
            return RunResult([], 0.0, 0, warmup_errors)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    in_flight = peak = 0
    progress = tqdm(total=len(requests), disable=not show_progress, unit="req")
    origin = time.perf_counter()

    async def one(index: int, request: BenchRequest, due: float) -> RequestRecord:
        nonlocal in_flight, peak
        await asyncio.sleep(max(0.0, origin + due - time.perf_counter()))
        if slots is not None:
            await slots.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await stream_request(client, settings, request, index, origin)
        finally:
            in_flight -= 1
            if slots is not None:
                slots.release()
            progress.update(1)

    due_times = arrival_times(len(requests), request_rate, seed)
    try:
        records = await asyncio.gather(*(one(i, r, due) for i, (r, due)
                                         in enumerate(zip(requests, due_times, strict=True))))
    finally:
        progress.close()
    duration = time.perf_counter() - origin
    return RunResult(list(records), duration, peak, [])
