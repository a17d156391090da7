"""The engine on a CUDA GPU: same greedy tokens as on CPU, KV pool sized by
--mem-fraction-static. Runs on the lent GPU machine; skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.model import LlamaModel
from services.engine.sampling_params import SamplingParams
from services.engine.weights import load_hf_weights
from tests.tiny_models import FAMILIES, VOCAB_SIZE, make_tiny_model

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(folder, device: str, **overrides) -> LLMEngine:
    model = LlamaModel(ModelConfig.from_hf_folder(folder), load_hf_weights(folder), device=device)
    return LLMEngine(model, None, EngineConfig(page_size=16, device=device, **overrides))


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_greedy_tokens_equal_cpu(tmp_path, family):
    make_tiny_model(family, tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist()
               for n in (5, 31, 64, 100)]
    cpu = _engine(tmp_path, "cpu", num_pages=128).generate(prompts, GREEDY)
    gpu = _engine(tmp_path, "cuda", num_pages=128, chunked_prefill_size=32).generate(prompts,
                                                                                      GREEDY)
    assert [r.token_ids for r in gpu] == [r.token_ids for r in cpu]


def test_mem_fraction_static_sizes_the_pool(tmp_path):
    make_tiny_model("llama", tmp_path)
    engine = _engine(tmp_path, "cuda", mem_fraction_static=0.05)
    free, total = torch.cuda.mem_get_info()
    pool_bytes = engine.pool.layout.total_bytes
    assert 0.01 * total < pool_bytes <= 0.05 * total
    assert engine.pool.data.is_cuda
    (result,) = engine.generate([[1, 2, 3]], GREEDY)
    assert len(result.token_ids) == 24
