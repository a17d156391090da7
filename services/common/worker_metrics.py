"""A worker's Prometheus metrics (unified, prefill, decode), on a registry of its own, served
at /metrics by `metrics_http`.

Contract: names carry the `tandem_worker_` prefix and base units (seconds, bytes); counters end
in `_total`; every series carries the worker's `mode` (unified, prefill, decode). Per-request
timings are taken on the servicer's event loop, never on the engine thread: the engine step
gains no lock and no allocation. Queue and page gauges are read at scrape time, from the
scrape thread, as plain ints and `len()` of the scheduler's lists — each read atomic, possibly
a step apart from each other — so a scrape never waits for, nor blocks, the engine thread; so
are the engine's step count, time in steps and scheduled tokens (counters).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from services.engine.engine import LLMEngine
    from services.engine.output import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# request outcomes besides the engine's finish reasons (stop, length, abort)
SENT = "sent"  # prefill: the KV and first token reached the decode side
ERROR = "error"  # answered with an error status
CANCELLED = "cancelled"  # the client went away first


class _EngineCollector(Collector):
    def __init__(self, mode: str, engine: LLMEngine) -> None:
        self.mode = mode
        self.engine = engine

    def collect(self):
        engine, mode = self.engine, [self.mode]
        running = len(engine.scheduler.running)
        waiting = len(engine.scheduler.waiting)
        total = engine.kv.num_pages
        free = engine.kv.num_free_pages
        for name, doc, value in (
                ("running_requests", "requests in the running batch", running),
                ("waiting_requests", "requests queued for admission", waiting),
                ("kv_pages_total", "pages of the KV pool", total),
                ("kv_pages_used", "KV pages held by requests (not free, not evictable)",
                 total - free),
                ("kv_pages_free", "KV pages free or evictable (prefix cache)", free),
                ("engine_last_step_end_seconds", "Unix time the engine's last step ended (0: "
                 "none yet): how long a worker was busy in a run that ends with others working",
                 engine.last_step_end)):
            family = GaugeMetricFamily(f"tandem_worker_{name}", doc, labels=["mode"])
            family.add_metric(mode, value)
            yield family
        for name, doc, value in (
                ("engine_steps", "engine steps run by the engine thread", engine.steps),
                ("engine_step_seconds", "wall time the engine thread spent in steps (its "
                 "share of elapsed time is the engine's duty)", engine.step_seconds),
                ("scheduled_tokens", "tokens of the scheduled batches (prompt chunks not "
                 "cached, and decode tokens)", engine.scheduler.scheduled_tokens)):
            counter = CounterMetricFamily(f"tandem_worker_{name}", doc, labels=["mode"])
            counter.add_metric(mode, value)
            yield counter


class WorkerMetrics:
    def __init__(self, mode: str, engine: LLMEngine) -> None:
        self.mode = mode
        self.registry = r = CollectorRegistry()
        m = [mode]
        self.ttft = Histogram("tandem_worker_time_to_first_token_seconds",
                              "time from request to its first token (prefill: the "
                              "bootstrap wait and the prefill)", ["mode"],
                              buckets=_LATENCY_BUCKETS,
                              registry=r).labels(*m)
        self.itl = Histogram("tandem_worker_inter_token_latency_seconds",
                             "time between consecutive streamed token deltas", ["mode"],
                             buckets=_ITL_BUCKETS, registry=r).labels(*m)
        self.e2e = Histogram("tandem_worker_request_duration_seconds",
                             "time from request to its end, any outcome", ["mode"],
                             buckets=_LATENCY_BUCKETS, registry=r).labels(*m)
        self.finished = Counter("tandem_worker_requests", "requests ended, by reason: stop, "
                                "length, abort (engine), sent (prefill), error, cancelled",
                                ["mode", "reason"], registry=r)
        self.prompt_tokens = Counter("tandem_worker_prompt_tokens",
                                     "prompt tokens of requests that ended well", ["mode"],
                                     registry=r).labels(*m)
        self.generation_tokens = Counter(
            "tandem_worker_generation_tokens", "tokens streamed to clients (prefill: none; "
            "its first token is the decode worker's first output)", ["mode"],
            registry=r).labels(*m)
        # prefill mode only
        self.prefill_seconds = Histogram(
            "tandem_worker_prefill_seconds", "prefill: from the decode side's bootstrap to the "
            "first token (queueing and the forward pass)", buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_send_seconds = Histogram(
            "tandem_worker_kv_send_seconds", "prefill: from asking kvd to send the KV to its "
            "landing at the decode side", buckets=_LATENCY_BUCKETS, registry=r)
        self.kv_sent_bytes = Counter("tandem_worker_kv_sent_bytes",
                                     "prefill: KV bytes kvd reported sending", registry=r)
        r.register(_EngineCollector(mode, engine))

    def request(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """One request's timings; `fail` after the end is a no-op, so call it on every exit."""

    __slots__ = ("_m", "_start", "_last", "_ended")

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._m = metrics
        self._start = time.perf_counter()
        self._last: float | None = None  # when the last token delta went out
        self._ended = False

    def tokens_out(self) -> None:
        """A delta with tokens goes out now: TTFT for the first, ITL after."""
        now = time.perf_counter()
        if self._last is None:
            self._m.ttft.observe(now - self._start)
        else:
            self._m.itl.observe(now - self._last)
        self._last = now

    def output(self, output: RequestOutput) -> None:
        if output.new_token_ids:
            self.tokens_out()
        if output.finished:
            self.finish(output.finish_reason or "stop", output.num_prompt_tokens,
                        output.num_output_tokens)

    def finish(self, reason: str, prompt_tokens: int, generated_tokens: int) -> None:
        if self._end(reason):
            self._m.prompt_tokens.inc(prompt_tokens)
            self._m.generation_tokens.inc(generated_tokens)

    def fail(self, reason: str = ERROR) -> None:
        self._end(reason)

    def _end(self, reason: str) -> bool:
        """Count the request's end once; False if it was counted already."""
        if self._ended:
            return False
        self._ended = True
        m = self._m
        m.e2e.observe(time.perf_counter() - self._start)
        m.finished.labels(m.mode, reason).inc()
        return True
