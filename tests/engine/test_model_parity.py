"""The engine against Hugging Face transformers on the same tiny random weights."""

from __future__ import annotations

import pytest
import torch

from services.engine.attention import TorchPagedAttention
from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.model import LlamaModel
from services.engine.runner import ModelRunner
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence
from services.engine.weights import load_hf_weights
from tests.tiny_models import FAMILIES, VOCAB_SIZE, make_tiny_model

NUM_STEPS = 32
GREEDY = SamplingParams(max_tokens=NUM_STEPS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(request.param, folder)
    return request.param, folder, hf


def _make_model(folder) -> LlamaModel:
    return LlamaModel(ModelConfig.from_hf_folder(folder), load_hf_weights(folder))


def _make_engine(folder, **overrides) -> LLMEngine:
    config = EngineConfig(**{"page_size": 4, "num_pages": 256, **overrides})
    return LLMEngine(_make_model(folder), None, config)


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist() for n in lengths]


def test_config_matches_transformers(tiny):
    family, folder, hf = tiny
    cfg = ModelConfig.from_hf_folder(folder)
    assert cfg.family == family
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    assert cfg.qk_norm == (family == "qwen3")
    assert cfg.attention_bias == (family in ("qwen2", "qwen3"))  # qwen3 built with o_proj bias


def test_prefill_and_every_decode_step_logits_match_transformers(tiny):
    _, folder, hf = tiny
    model = _make_model(folder)
    cfg = model.config
    pool = KVPool.allocate(KVLayout(32, cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim))
    runner = ModelRunner(model, pool, TorchPagedAttention(cfg.num_heads, cfg.num_kv_heads,
                                                          cfg.head_dim, cfg.sliding_window))
    (prompt,) = _prompts(1, [21])
    seq = Sequence("r", list(prompt), len(prompt), GREEDY, 0, page_ids=[9, 10, 3, 4, 5, 6, 7,
                                                                           20, 21, 22, 23, 24, 25])
    ours = []
    for _ in range(NUM_STEPS):
        num_new = seq.num_uncomputed_tokens
        out = runner.run(ScheduledBatch([seq], [num_new]))
        seq.num_computed_tokens += num_new
        ours.append(out.logits[0])
        seq.token_ids.append(int(out.logits[0].argmax()))
    with torch.no_grad():
        ref = hf(torch.tensor([seq.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(torch.stack(ours), ref, atol=2e-4, rtol=1e-4)


def test_greedy_tokens_identical_to_transformers_generate(tiny):
    _, folder, hf = tiny
    engine = _make_engine(folder)
    prompts = _prompts(2, [5, 17, 33])
    results = engine.generate(prompts, GREEDY)
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            # EOS must not stop (ignore_eos) nor be suppressed (as min_new_tokens would)
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NUM_STEPS, do_sample=False,
                              stopping_criteria=None, eos_token_id=[], pad_token_id=0)
        assert result.token_ids == ref[0, len(prompt) :].tolist()
        assert result.finish_reason == "length"


def _alone(folder, prompts):
    engine = _make_engine(folder, enable_prefix_cache=False)
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_batched_chunked_cached_and_preempted_runs_equal_runs_alone(tiny):
    _, folder, _ = tiny
    prompts = _prompts(3, [3, 9, 26, 41, 12, 64])
    shared = prompts[3][:24]
    prompts += [shared + [7, 8, 9], shared + [1]]  # prefix-cache hits on full pages
    expected = _alone(folder, prompts)

    batched = _make_engine(folder, enable_prefix_cache=False)
    assert [r.token_ids for r in batched.generate(prompts, GREEDY)] == expected

    chunked = _make_engine(folder, chunked_prefill_size=5)
    assert [r.token_ids for r in chunked.generate(prompts, GREEDY)] == expected

    cached = _make_engine(folder)
    cached.generate(prompts[:4], GREEDY)
    results = cached.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == expected
    assert all(r.num_cached_tokens >= 24 for r in results[-2:])

    # 20 pages of 4 tokens cannot hold all 8 sequences: some must be preempted and recomputed
    tight = _make_engine(folder, num_pages=40, enable_prefix_cache=False)
    assert [r.token_ids for r in tight.generate(prompts, GREEDY)] == expected
    assert tight.scheduler.num_preemptions > 0
    assert tight.kv.num_held_pages == 0
