"""The gateway's Prometheus metrics, on a registry of its own (served at /metrics).

Contract: names carry the `tandem_gateway_` prefix and base units (seconds, bytes); counters end
in `_total`. Worker health and in-flight counts are read from the workers at scrape time, so
they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.proto.tandem.v1 import worker_pb2

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _WorkerCollector(Collector):
    def __init__(self, workers: Callable[[], Iterable]) -> None:
        self.workers = workers

    def collect(self):
        healthy = GaugeMetricFamily("tandem_gateway_worker_healthy",
                                    "1 when the worker is in rotation", labels=["role", "url"])
        in_flight = GaugeMetricFamily("tandem_gateway_worker_in_flight_requests",
                                      "requests this gateway has in flight on the worker",
                                      labels=["role", "url"])
        load = GaugeMetricFamily("tandem_gateway_worker_reported_load",
                                 "running + waiting requests the worker last reported",
                                 labels=["role", "url"])
        for w in self.workers():
            healthy.add_metric([w.role, w.url], 1.0 if w.healthy else 0.0)
            in_flight.add_metric([w.role, w.url], w.in_flight)
            load.add_metric([w.role, w.url], w.reported_load)
        yield from (healthy, in_flight, load)


class GatewayMetrics:
    def __init__(self, workers: Callable[[], Iterable] = lambda: ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_gateway_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.e2e = Histogram("tandem_gateway_request_duration_seconds",
                             "time from request to its last byte", ["endpoint"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tandem_gateway_time_to_first_token_seconds",
                              "time from request to its first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tandem_gateway_inter_token_latency_seconds",
                             "time between consecutive streamed token deltas",
                             buckets=_ITL_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tandem_gateway_prompt_tokens", "prompt tokens served",
                                     registry=r)
        self.completion_tokens = Counter("tandem_gateway_completion_tokens",
                                         "tokens generated", registry=r)
        self.retries = Counter("tandem_gateway_retries",
                               "attempts retried on another worker, by the failed leg",
                               ["role", "reason"], registry=r)
        self.cancellations = Counter("tandem_gateway_cancellations",
                                     "requests whose client went away before the end",
                                     registry=r)
        self.removals = Counter("tandem_gateway_worker_removals",
                                "times a worker was taken out of rotation", ["role"], registry=r)
        self.kv_bytes = Counter("tandem_gateway_kv_transfer_bytes",
                                "KV bytes prefill workers reported sending", ["backend"],
                                registry=r)
        self.kv_seconds = Histogram("tandem_gateway_kv_transfer_seconds",
                                    "KV transfer time prefill workers reported", ["backend"],
                                    buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_WorkerCollector(workers))

    def retry(self, role: str, reason: str) -> None:
        self.retries.labels(role, reason).inc()

    def worker_removed(self, role: str) -> None:
        self.removals.labels(role).inc()

    def kv_transfer(self, response: worker_pb2.PrefillResponse) -> None:
        backend = response.transfer_backend or "unknown"
        self.kv_bytes.labels(backend).inc(response.kv_bytes)
        self.kv_seconds.labels(backend).observe(response.transfer_seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
