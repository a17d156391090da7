"""PD output equals unified output: real kvds, real prefill and decode workers, KV over NIXL
between two kvds (two "nodes" on loopback) and over the same-node path within one kvd."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.proto.tandem.v1 import worker_pb2
from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.model import LlamaModel
from services.engine.sampling_params import SamplingParams
from services.engine.weights import load_hf_weights
from tests.pd.harness import (
    Deployment,
    kvd_pinned,
    pd_generate,
    start_node,
    start_worker,
    worker_load,
)
from tests.tiny_models import VOCAB_SIZE

NUM_REQUESTS = 16


@pytest.fixture(scope="module", params=["nixl", "mooncake"])
def two_nodes(request, model, tmp_path_factory):
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"pd-{backend}")
    d = Deployment(backend=backend)
    try:
        d.nodes = [start_node(tmp, "node-p", backend), start_node(tmp, "node-d", backend)]
        chunk = ["--chunked-prefill-size", "16"]
        d.prefill.append(start_worker(tmp, "prefill", str(model), d.nodes[0], backend, chunk))
        d.decode.append(start_worker(tmp, "decode", str(model), d.nodes[1], backend, chunk))
        # a decode worker on the prefill's node: the same-node path
        d.decode.append(start_worker(tmp, "decode", str(model), d.nodes[0], backend, chunk))
        yield d
    finally:
        d.stop_all()


def _requests() -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(7)
    lengths = [3, 5, 8, 13, 17, 21, 30, 34, 40, 47, 55, 60, 9, 16, 33, 70]
    return [(torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist(), 8 + i % 5)
            for i, n in enumerate(lengths)]


def _unified(model) -> list[list[int]]:
    engine = LLMEngine(LlamaModel(ModelConfig.from_hf_folder(model), load_hf_weights(model)),
                       None, EngineConfig(page_size=4, num_pages=512))
    reqs = _requests()
    results = engine.generate([p for p, _ in reqs], [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs])
    return [r.token_ids for r in results]


def _proto(prompt: list[int], max_tokens: int) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        token_ids=worker_pb2.TokenIds(ids=prompt),
        sampling=worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True))


@pytest.mark.parametrize("decode_index", [0, 1], ids=["two-nodes", "same-node"])
def test_16_concurrent_pd_requests_equal_unified(model, two_nodes, decode_index):
    d = two_nodes
    path = d.backend if decode_index == 0 else "local"
    (_, prefill_port), (_, decode_port) = d.prefill[0], d.decode[decode_index]
    prefill_kvd = d.nodes[0].kvd_address
    decode_kvd = d.nodes[decode_index == 0 and 1 or 0].kvd_address
    expected = _unified(model)

    async def run():
        return await asyncio.gather(*[
            pd_generate(prefill_port, decode_port, prefill_kvd, decode_kvd, _proto(p, n))
            for p, n in _requests()])

    results = asyncio.run(run())
    assert [ids for ids, _, _ in results] == expected
    assert all(pre.kv_bytes > 0 and pre.transfer_backend == path for _, _, pre in results)
    # one descriptor per run of pages adjacent on both sides: fresh pools give one run
    assert min(pre.num_descriptors for _, _, pre in results) == 1
    for node in d.nodes:
        assert asyncio.run(kvd_pinned(node)) == 0
    for _, port in d.prefill + d.decode:
        load = asyncio.run(worker_load(port))
        assert load.num_free_pages == load.num_pages and load.num_running == 0
