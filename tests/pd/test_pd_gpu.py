"""PD across two GPUs equals unified: a prefill worker on GPU 0 and decode workers on GPU 1
compute in VRAM pools their kvds own (CUDA IPC); KV moves over the same-node path (one kvd
holding pools on both GPUs) and over NIXL between two kvds."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.pd.harness import (
    Deployment,
    kvd_pinned,
    kvd_stats,
    pd_generate,
    pd_request,
    start_node,
    start_worker,
    unified_token_ids,
)
from tests.tiny_models import VOCAB_SIZE, make_tiny_model

pytestmark = pytest.mark.gpu
# float32 and the torch reference attention: tokens comparable with the CPU engine's
GPU_FLAGS = ["--device", "cuda", "--dtype", "float32", "--attention-backend", "torch_native",
             "--disable-cuda-graph", "--chunked-prefill-size", "16"]


def _requests() -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist(), 6 + i % 4)
            for i, n in enumerate([3, 9, 17, 30, 41, 64, 5, 22])]


def test_pd_across_two_gpus_equals_unified(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = tmp_path / "model"
    make_tiny_model("llama", model)
    d = Deployment(backend="nixl")
    try:
        d.nodes = [start_node(tmp_path, "node-a", "nixl"), start_node(tmp_path, "node-b", "nixl")]
        d.prefill.append(start_worker(tmp_path, "prefill", str(model), d.nodes[0], "nixl",
                                      [*GPU_FLAGS, "--base-gpu-id", "0"]))
        for node in d.nodes:  # decode on GPU 1: same kvd as the prefill (local), and another
            d.decode.append(start_worker(tmp_path, "decode", str(model), node, "nixl",
                                         [*GPU_FLAGS, "--base-gpu-id", "1"]))
        stats = asyncio.run(kvd_stats(d.nodes[0]))
        assert len(stats.pools) == 2  # one kvd, pools on GPU 0 and GPU 1
        expected = unified_token_ids(model, _requests())
        (_, prefill_port) = d.prefill[0]
        for (_, decode_port), decode_node, path in zip(d.decode, d.nodes, ("local", "nixl"),
                                                       strict=True):
            async def run(port: int = decode_port, node=decode_node):
                return await asyncio.gather(*[
                    pd_generate(prefill_port, port, d.nodes[0].kvd_address, node.kvd_address,
                                pd_request(p, n)) for p, n in _requests()])

            results = asyncio.run(run())
            assert [ids for ids, _, _ in results] == expected, path
            assert {pre.transfer_backend for _, _, pre in results} == {path}
        for node in d.nodes:
            assert asyncio.run(kvd_pinned(node)) == 0
    finally:
        d.stop_all()
