"""The embedded SmolLM2-135M-Instruct GGUF: answers correctly and matches transformers."""

from __future__ import annotations

import pytest
import torch

from services.engine.attention import TorchPagedAttention
from services.engine.embedded import embedded_model_path
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.loader import load_model
from services.engine.runner import ModelRunner
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded():
    return load_model(None)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def test_answers_the_capital_of_france(loaded):
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig())
    prompt = loaded.tokenizer.encode_chat(QUESTION)
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0))
    assert "Paris" in result.text
    assert result.finish_reason == "stop"
    assert engine.kv.num_held_pages == 0


def test_logits_and_greedy_tokens_match_transformers_on_the_same_gguf(loaded, reference):
    model, cfg = loaded.model, loaded.config
    pool = KVPool.allocate(KVLayout(16, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim))
    runner = ModelRunner(model, pool, TorchPagedAttention(cfg.num_heads, cfg.num_kv_heads,
                                                          cfg.head_dim))
    prompt = loaded.tokenizer.encode_chat(QUESTION)
    seq = Sequence("r", list(prompt), len(prompt), SamplingParams(), 0,
                   page_ids=[3, 4, 5, 9, 10, 11])
    ours = []
    for _ in range(12):
        num_new = seq.num_uncomputed_tokens
        out = runner.run(ScheduledBatch([seq], [num_new]))
        seq.num_computed_tokens += num_new
        ours.append(out.logits[0])
        seq.token_ids.append(int(out.logits[0].argmax()))
    with torch.no_grad():
        ref = reference(torch.tensor([seq.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(torch.stack(ours), ref, atol=1e-3, rtol=1e-4)
    assert seq.output_token_ids == ref.argmax(-1).tolist()
