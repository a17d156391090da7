"""PD across two network namespaces: the prefill node and the decode node each run a kvd and a
worker on their own address, joined by veths on a bridge (tests/pd/netns.py), so the KV crosses
a network interface — NIXL forced onto TCP (`UCX_TLS=tcp`), and Mooncake over TCP. Outputs
equal the in-process unified engine, and the veth counters carried at least the KV's bytes."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.pd import netns
from tests.pd.harness import (
    Deployment,
    Node,
    launch_worker,
    pd_generate_at,
    pd_request,
    unified_token_ids,
    wait_baseline,
)
from tests.procs import start_kvd
from tests.tiny_models import VOCAB_SIZE

# long prompts: the KV (~770 KB) dwarfs the gRPC and heartbeat traffic on the same veths
PROMPT_LENGTHS = [37, 90, 131, 170, 212, 250, 293, 330]


@pytest.fixture(scope="module")
def network():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.two_node_network() as net:
        yield net


def _requests() -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist(), 6 + i % 4)
            for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_8_concurrent_pd_requests_across_namespaces_equal_unified(model, network, backend,
                                                                 tmp_path):
    env = {"UCX_TLS": "tcp"} if backend == "nixl" else {}  # else UCX copies through CMA
    d = Deployment(backend=backend)
    try:
        for net_node in (network.prefill, network.decode):
            proc, sock, address = start_kvd(tmp_path, net_node.netns, backend,
                                            host=net_node.address, env=env,
                                            netns=net_node.netns)
            d.nodes.append(Node(proc, sock, address))
        node_p, node_d = d.nodes
        chunk = ["--chunked-prefill-size", "64"]
        d.prefill.append(launch_worker(tmp_path, "prefill", str(model), node_p, backend,
                                       host=network.prefill.address,
                                       netns=network.prefill.netns, extra=chunk))
        d.decode.append(launch_worker(tmp_path, "decode", str(model), node_d, backend,
                                      host=network.decode.address, netns=network.decode.netns,
                                      extra=chunk))
        prefill = f"{network.prefill.address}:{d.prefill[0][1]}"
        decode = f"{network.decode.address}:{d.decode[0][1]}"
        requests = _requests()
        expected = unified_token_ids(model, requests)

        async def run():
            return await asyncio.gather(*[
                pd_generate_at(prefill, decode, node_p.kvd_address, node_d.kvd_address,
                               pd_request(p, n)) for p, n in requests])

        p_rx0, p_tx0 = netns.link_bytes(network.prefill.netns)
        d_rx0, d_tx0 = netns.link_bytes(network.decode.netns)
        results = asyncio.run(run())
        p_rx1, p_tx1 = netns.link_bytes(network.prefill.netns)
        d_rx1, d_tx1 = netns.link_bytes(network.decode.netns)

        assert [ids for ids, _ in results] == expected
        assert all(pre.transfer_backend == backend for _, pre in results)
        kv_bytes = sum(pre.kv_bytes for _, pre in results)
        # page-major fp32 KV of 2 layers x 2 heads x 16 dims: 512 bytes a token, 4-token pages
        assert kv_bytes == sum(-(-n // 4) * 4 * 512 for n in PROMPT_LENGTHS)
        # the KV left the prefill namespace and entered the decode one through the veths
        assert p_tx1 - p_tx0 > kv_bytes, (p_tx1 - p_tx0, kv_bytes)
        assert d_rx1 - d_rx0 > kv_bytes, (d_rx1 - d_rx0, kv_bytes)
        asyncio.run(wait_baseline(d.nodes, [(prefill, "prefill"), (decode, "decode")]))
    finally:
        d.stop_all()
