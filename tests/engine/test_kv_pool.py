"""The engine computes in a KV pool on memory it did not allocate (kvd's shared segment)."""

from __future__ import annotations

from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.model import LlamaModel
from services.engine.sampling_params import SamplingParams
from services.engine.weights import load_hf_weights
from tests.tiny_models import make_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _make_model(folder) -> LlamaModel:
    return LlamaModel(ModelConfig.from_hf_folder(folder), load_hf_weights(folder))


def test_page_is_one_contiguous_block_of_all_layers():
    layout = KVLayout(num_pages=8, num_layers=3, page_size=4, num_kv_heads=2, head_dim=8)
    pool = KVPool.allocate(layout)
    assert layout.page_bytes == 3 * 2 * 4 * 2 * 8 * 4
    page = pool.data[5]
    assert page.is_contiguous()
    assert page.data_ptr() - pool.data.data_ptr() == 5 * layout.page_bytes
    # the flat row of (page 5, layer 2, V, offset 3) is inside page 5's block
    row = int(pool.slot_rows(torch.tensor(5), torch.tensor(3))) + pool.layer_offset(2, True)
    assert pool.flat[row].data_ptr() == pool.data[5, 2, 1, 3].data_ptr()


def test_buffer_too_small_is_an_error():
    layout = KVLayout(num_pages=4, num_layers=1, page_size=4, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="needs"):
        KVPool.on_buffer(layout, torch.zeros(layout.total_bytes - 1, dtype=torch.uint8))


def test_engine_on_shared_memory_pool_matches_its_own_pool(tmp_path):
    folder = tmp_path / "m"
    make_tiny_model("llama", folder)
    model = _make_model(folder)
    cfg = model.config
    layout = KVLayout(64, cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim)
    segment = shared_memory.SharedMemory(create=True, size=layout.total_bytes)
    try:
        buffer = torch.frombuffer(segment.buf, dtype=torch.uint8)
        pool = KVPool.on_buffer(layout, buffer)
        assert pool.data.data_ptr() == buffer.data_ptr()  # no copy
        prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]
        shared = LLMEngine(model, None, EngineConfig(page_size=4), pool=pool)
        got = [r.token_ids for r in shared.generate(prompts, GREEDY)]
        # another mapping of the same segment sees the KV the engine wrote
        other = shared_memory.SharedMemory(name=segment.name)
        assert np.frombuffer(other.buf, dtype=np.uint8).any()
        del buffer, pool, shared
        other.close()
    finally:
        segment.close()
        segment.unlink()
    own = LLMEngine(_make_model(folder), None, EngineConfig(page_size=4, num_pages=64))
    assert [r.token_ids for r in own.generate(prompts, GREEDY)] == got
