"""kvd's Prometheus metrics, on a registry of its own, served at /metrics by `metrics_http`.

Contract: names carry the `tandem_kvd_` prefix and base units (seconds, bytes; throughput in
GB/s, 1e9 bytes a second); counters end in `_total`. Failure reasons are short and stable:
a gRPC status name in lower case, or one of "timeout", "peer_dead", "layout_mismatch",
"page_count_mismatch", "backend_error", "backend_mismatch", "cancelled", "internal".
Counters are bumped on kvd's event loop where the event happens (no lock of ours). Pool and
room gauges are read at scrape time by a snapshot taken on the event loop — the pools' page
maps are the loop's alone — so the scrape thread never touches them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                    5, 10, 30)
_GBPS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 200, 400)
SNAPSHOT_TIMEOUT_S = 2.0


class PoolSnapshot:
    __slots__ = ("pool_id", "num_pages", "pinned_pages")

    def __init__(self, pool_id: str, num_pages: int, pinned_pages: int) -> None:
        self.pool_id = pool_id
        self.num_pages = num_pages
        self.pinned_pages = pinned_pages


Snapshot = tuple[list[PoolSnapshot], int]  # pools, open rooms


class _StateCollector(Collector):
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 snapshot: Callable[[], Snapshot]) -> None:
        self.loop = loop
        self.snapshot = snapshot

    def collect(self):
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(self.snapshot())
            except BaseException as e:  # noqa: BLE001 - handed to the scrape thread
                future.set_exception(e)

        try:
            self.loop.call_soon_threadsafe(take)
            pools, open_rooms = future.result(SNAPSHOT_TIMEOUT_S)
        except (RuntimeError, concurrent.futures.TimeoutError):  # loop closed or stuck
            return
        total = GaugeMetricFamily("tandem_kvd_pool_pages_total", "pages of the pool",
                                  labels=["pool"])
        pinned = GaugeMetricFamily("tandem_kvd_pool_pages_pinned",
                                   "pages pinned by rooms (being filled or sent)",
                                   labels=["pool"])
        free = GaugeMetricFamily("tandem_kvd_pool_pages_free", "pages no room pins",
                                 labels=["pool"])
        for p in pools:
            total.add_metric([p.pool_id], p.num_pages)
            pinned.add_metric([p.pool_id], p.pinned_pages)
            free.add_metric([p.pool_id], p.num_pages - p.pinned_pages)
        rooms = GaugeMetricFamily("tandem_kvd_open_rooms",
                                  "rooms open: expected, sending or awaiting a bootstrap")
        rooms.add_metric([], open_rooms)
        yield from (total, pinned, free, rooms)


class KvdMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.transfer_bytes = Counter("tandem_kvd_transfer_bytes",
                                      "KV bytes written to peers", ["backend"], registry=r)
        self.transfer_seconds = Histogram("tandem_kvd_transfer_seconds",
                                          "time of one room's KV write", ["backend"],
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.transfer_gbps = Histogram("tandem_kvd_transfer_throughput_gigabytes_per_second",
                                       "one room's KV write: bytes / seconds / 1e9",
                                       ["backend"], buckets=_GBPS_BUCKETS, registry=r)
        self.transfer_failures = Counter("tandem_kvd_transfer_failures",
                                         "rooms whose KV write or report failed at the sender",
                                         ["reason"], registry=r)
        self.handshake_failures = Counter("tandem_kvd_handshake_failures",
                                          "handshakes with a peer kvd that failed (either side)",
                                          ["reason"], registry=r)
        self.heartbeat_failures = Counter("tandem_kvd_heartbeat_failures",
                                          "heartbeats a peer kvd did not answer", registry=r)
        self.rooms_completed = Counter("tandem_kvd_rooms_completed",
                                       "rooms whose KV landed, by side: send (prefill node), "
                                       "recv (decode node)", ["side"], registry=r)
        self.transfer_done = Counter("tandem_kvd_transfer_done",
                                     "prefill kvds' reports of a room's KV taken here (decode "
                                     "node), by how they came: notification (NIXL), rpc, "
                                     "in_process (same node)", ["via"], registry=r)
        self.early_answers = Counter("tandem_kvd_early_answers",
                                     "decode workers answered while their room's KV was still "
                                     "in flight, with a ready flag (decode node)", registry=r)
        self.rooms_failed = Counter("tandem_kvd_rooms_failed",
                                    "rooms that failed, timed out or were cancelled",
                                    ["side", "reason"], registry=r)

    def watch(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], Snapshot]) -> None:
        """Serve the pool and room gauges from `snapshot()`, taken on `loop`."""
        self.registry.register(_StateCollector(loop, snapshot))

    def transferred(self, backend: str, num_bytes: int, seconds: float) -> None:
        self.transfer_bytes.labels(backend).inc(num_bytes)
        self.transfer_seconds.labels(backend).observe(seconds)
        if seconds > 0:
            self.transfer_gbps.labels(backend).observe(num_bytes / seconds / 1e9)


def failure_reason(error: BaseException | None) -> str:
    """The stable reason string of an exception ending a room ("internal" for None: a room
    that ended without one, yet failed)."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, str):
        return reason
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return "internal"
