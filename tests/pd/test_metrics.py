"""Every service's Prometheus /metrics against a known workload: a PD deployment of real
processes (two kvds, a prefill and a decode worker), five requests of known prompt lengths
and token counts, then each /metrics (address from GetModelInfo / Stats) scraped and its
counts compared with what the workload and the services' own RPCs report."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.proto.tandem.v1 import worker_pb2, worker_pb2_grpc
from tests.pd.harness import (
    Deployment,
    Node,
    kvd_stats,
    load_at,
    pd_generate,
    pd_request,
    start_node,
    start_worker,
    wait_baseline,
)
from tests.procs import free_port, start, stop, wait_healthy
from tests.tiny_models import VOCAB_SIZE

WORKLOAD = [(5, 3), (9, 6), (16, 4), (23, 9), (40, 7)]  # (prompt tokens, max_tokens)


@pytest.fixture(scope="module")
def deployment(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pd-metrics")
    d = Deployment(backend="nixl")
    try:
        d.nodes = [start_node(tmp, "node-p", "nixl"), start_node(tmp, "node-d", "nixl")]
        d.prefill.append(start_worker(tmp, "prefill", str(model), d.nodes[0], "nixl"))
        d.decode.append(start_worker(tmp, "decode", str(model), d.nodes[1], "nixl"))
        yield d
    finally:
        d.stop_all()


def scrape(address: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of http://address/metrics: (name, labels) -> value."""
    assert address, "the service reported no metrics address"
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def model_info(port: int, mode: str) -> worker_pb2.ModelInfoResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = (worker_pb2_grpc.PrefillServiceStub(ch) if mode == "prefill"
                else worker_pb2_grpc.GenerateServiceStub(ch))
        return await stub.GetModelInfo(worker_pb2.ModelInfoRequest(), timeout=5.0)


async def _run_workload(d: Deployment):
    (_, pport), (_, dport) = d.prefill[0], d.decode[0]
    pkvd, dkvd = d.nodes[0].kvd_address, d.nodes[1].kvd_address
    requests = [pd_request([(7 * i + j) % (VOCAB_SIZE - 3) for j in range(n)], max_tokens)
                for i, (n, max_tokens) in enumerate(WORKLOAD)]
    return await asyncio.gather(*(pd_generate(pport, dport, pkvd, dkvd, r) for r in requests))


def test_metrics_count_the_workload(deployment):
    d = deployment
    (_, pport), (_, dport) = d.prefill[0], d.decode[0]
    workers = [(f"127.0.0.1:{pport}", "prefill"), (f"127.0.0.1:{dport}", "decode")]
    started = time.time()
    results = asyncio.run(_run_workload(d))
    asyncio.run(wait_baseline(d.nodes, workers))
    ended = time.time()

    generated = [len(ids) for ids, _, _ in results]
    assert generated == [n for _, n in WORKLOAD]  # ignore_eos: each ends at its max_tokens
    prefills = [pre for _, _, pre in results]
    prompt_tokens = sum(n for n, _ in WORKLOAD)
    kv_bytes = sum(pre.kv_bytes for pre in prefills)
    assert kv_bytes > 0
    n = len(WORKLOAD)

    # --- decode worker ---
    info = asyncio.run(model_info(dport, "decode"))
    m = scrape(info.metrics_address)
    assert value(m, "tandem_worker_requests_total", mode="decode") == n
    assert value(m, "tandem_worker_requests_total", mode="decode", reason="length") == n
    assert value(m, "tandem_worker_generation_tokens_total") == sum(generated)
    assert value(m, "tandem_worker_prompt_tokens_total") == prompt_tokens
    assert value(m, "tandem_worker_time_to_first_token_seconds_count", mode="decode") == n
    assert value(m, "tandem_worker_request_duration_seconds_count", mode="decode") == n
    # one token per step after the first: one gap per token but each request's first
    assert value(m, "tandem_worker_inter_token_latency_seconds_count") == sum(generated) - n
    load = asyncio.run(load_at(f"127.0.0.1:{dport}", "decode"))
    assert value(m, "tandem_worker_kv_pages_total") == load.num_pages
    assert value(m, "tandem_worker_kv_pages_free") == load.num_free_pages
    assert value(m, "tandem_worker_kv_pages_used") == load.num_pages - load.num_free_pages
    assert value(m, "tandem_worker_running_requests") == 0
    assert value(m, "tandem_worker_waiting_requests") == 0
    # the decode engine computes each token after the prefill side's first, one per step
    assert value(m, "tandem_worker_scheduled_tokens_total") == sum(generated) - n
    steps = value(m, "tandem_worker_engine_steps_total")
    assert max(generated) - 1 <= steps <= sum(generated) - n
    assert value(m, "tandem_worker_engine_step_seconds_total") > 0
    assert started < value(m, "tandem_worker_engine_last_step_end_seconds") < ended

    # --- prefill worker ---
    info = asyncio.run(model_info(pport, "prefill"))
    m = scrape(info.metrics_address)
    assert value(m, "tandem_worker_requests_total", mode="prefill", reason="sent") == n
    assert value(m, "tandem_worker_requests_total", mode="prefill") == n
    assert value(m, "tandem_worker_prompt_tokens_total") == sum(p.prompt_tokens for p in prefills)
    assert value(m, "tandem_worker_generation_tokens_total") == 0
    assert value(m, "tandem_worker_time_to_first_token_seconds_count", mode="prefill") == n
    assert value(m, "tandem_worker_prefill_seconds_count") == n
    assert value(m, "tandem_worker_kv_send_seconds_count") == n
    assert value(m, "tandem_worker_kv_sent_bytes_total") == kv_bytes
    computed = sum(p.prompt_tokens - p.cached_tokens for p in prefills)
    assert value(m, "tandem_worker_scheduled_tokens_total") == computed
    assert 1 <= value(m, "tandem_worker_engine_steps_total") <= n  # no prompt needs 2 chunks
    assert value(m, "tandem_worker_engine_step_seconds_total") > 0
    assert started < value(m, "tandem_worker_engine_last_step_end_seconds") < ended
    load = asyncio.run(load_at(f"127.0.0.1:{pport}", "prefill"))
    assert value(m, "tandem_worker_kv_pages_total") == load.num_pages
    assert value(m, "tandem_worker_kv_pages_free") == load.num_free_pages

    # --- kvds ---
    for node, side in ((d.nodes[0], "send"), (d.nodes[1], "recv")):
        stats = asyncio.run(kvd_stats(node))
        m = scrape(stats.metrics_address)
        assert value(m, "tandem_kvd_rooms_completed_total", side=side) == n
        assert value(m, "tandem_kvd_rooms_completed_total") == stats.rooms_completed
        assert value(m, "tandem_kvd_rooms_failed_total") == stats.rooms_failed == 0
        assert value(m, "tandem_kvd_open_rooms") == stats.open_rooms
        assert stats.pools
        for pool in stats.pools:
            assert value(m, "tandem_kvd_pool_pages_total", pool=pool.pool_id) == pool.num_pages
            assert value(m, "tandem_kvd_pool_pages_pinned",
                         pool=pool.pool_id) == pool.pinned_pages
            assert value(m, "tandem_kvd_pool_pages_free",
                         pool=pool.pool_id) == pool.num_pages - pool.pinned_pages
        assert value(m, "tandem_kvd_transfer_failures_total") == 0
        assert value(m, "tandem_kvd_handshake_failures_total") == 0
        sent = value(m, "tandem_kvd_transfer_bytes_total")
        assert sent == stats.bytes_sent == (kv_bytes if side == "send" else 0)
        writes = value(m, "tandem_kvd_transfer_seconds_count", backend=prefills[0].transfer_backend)
        assert writes == (n if side == "send" else 0)
        assert value(m, "tandem_kvd_transfer_throughput_gigabytes_per_second_count") == writes


def test_kvd_metrics_port_flag(tmp_path):
    """A given --metrics-port is the one reported; -1 turns the endpoint off."""
    port = free_port()
    procs = []
    try:
        for name, flag in (("fixed", str(port)), ("off", "-1")):
            sock = str(tmp_path / f"{name}.sock")
            proc = start(["-m", "services.kvd", "--port", str(free_port()), "--socket", sock,
                          "--backend", "nixl", "--metrics-port", flag], tmp_path / f"{name}.log")
            procs.append(proc)
            wait_healthy(f"unix:{sock}", proc)
            stats = asyncio.run(kvd_stats(Node(proc, sock, "")))
            if flag == "-1":
                assert stats.metrics_address == ""
            else:
                assert stats.metrics_address == f"127.0.0.1:{port}"
                assert value(scrape(stats.metrics_address), "tandem_kvd_open_rooms") == 0
    finally:
        for proc in procs:
            stop(proc)
