"""The engine's PD hooks: prefill keeps its KV pages, decode continues from KV copied in.

The copy here is a plain tensor copy between two engines' pools — what kvd does over a
transfer backend. PD output must equal unified output.
"""

from __future__ import annotations

import torch

from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.model import LlamaModel
from services.engine.output import Completion
from services.engine.sampling_params import SamplingParams
from services.engine.weights import load_hf_weights
from tests.tiny_models import VOCAB_SIZE, make_tiny_model


def _make_engine(folder, **overrides) -> LLMEngine:
    model = LlamaModel(ModelConfig.from_hf_folder(folder), load_hf_weights(folder))
    return LLMEngine(model, None, EngineConfig(**{"page_size": 4, "num_pages": 128,
                                                  **overrides}))


def _run_pd(prefill: LLMEngine, decode: LLMEngine, prompts, params) -> list[Completion]:
    results = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        rid = f"r{i}"
        prefill.add_request(rid, prompt, SamplingParams.create(**{**_fields(p), "max_tokens": 1}),
                            keep_kv=True)
        first = None
        while first is None:
            first = next((o for o in prefill.step() if o.request_id == rid), None)
        assert first.finished and first.kv_page_ids is not None
        dst = decode.add_remote_prefill(rid, prompt, p)
        assert dst is not None and len(dst) == len(first.kv_page_ids)
        decode.pool.data[dst] = prefill.pool.data[first.kv_page_ids]  # kvd's job
        assert prefill.release_kv(rid)
        completion = Completion(rid, list(prompt))
        out = decode.kv_arrived(rid, first.new_token_ids[0],
                                first.new_logprobs[0] if first.new_logprobs else None)
        completion.add(out)
        while completion.finish_reason is None:
            for o in decode.step():
                if o.request_id == rid:
                    completion.add(o)
        results.append(completion)
    return results


def _fields(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in p.__slots__}


def test_pd_equals_unified_and_frees_every_page(tmp_path):
    folder = tmp_path / "m"
    make_tiny_model("qwen2", folder)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist()
               for n in (3, 4, 9, 17, 30)]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=12, temperature=0.8, seed=11, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)]
    unified = _make_engine(folder).generate(prompts, params)
    prefill, decode = _make_engine(folder), _make_engine(folder, chunked_prefill_size=8)
    pd = _run_pd(prefill, decode, prompts, params)
    for u, d in zip(unified, pd, strict=True):
        assert d.token_ids == u.token_ids
        assert d.finish_reason == u.finish_reason
    assert [lp.token_id for lp in pd[2].logprobs] == pd[2].token_ids
    assert prefill.kv.num_held_pages == 0 and decode.kv.num_held_pages == 0
    assert not prefill.has_unfinished() and not decode.has_unfinished()


def test_abort_while_awaiting_kv_or_holding_kv_frees_pages(tmp_path):
    folder = tmp_path / "m"
    make_tiny_model("llama", folder)
    engine = _make_engine(folder)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    assert engine.add_remote_prefill("d", list(range(10)), greedy) is not None
    assert engine.kv.num_held_pages == 3
    assert not engine.has_work()
    assert engine.abort("d") is not None
    engine.add_request("p", list(range(10)), greedy, keep_kv=True)
    (out,) = engine.step()
    assert out.kv_page_ids is not None and engine.kv.num_held_pages == 3
    assert engine.abort("p") is not None
    assert engine.kv.num_held_pages == 0
    assert not engine.release_kv("p")


def test_full_pool_refuses_remote_reservation_without_holding(tmp_path):
    folder = tmp_path / "m"
    make_tiny_model("llama", folder)
    engine = _make_engine(folder, num_pages=4)
    p = SamplingParams(max_tokens=4, temperature=0.0)
    assert engine.add_remote_prefill("a", list(range(12)), p) is not None
    assert engine.add_remote_prefill("b", list(range(8)), p) is None
    assert engine.kv.num_held_pages == 3 and engine.has_unfinished()
    engine.abort("a")
    assert engine.kv.num_held_pages == 0


def test_kv_is_announced_once_queued_before_its_first_token_is_sampled(tmp_path):
    """`on_kv_computed` fires in the step whose forward pass completes a keep_kv prompt (the
    last of its chunks), before sampling, with the pages the finishing output carries; never
    for a plain request. On CPU there is no event: the KV is complete once queued."""
    folder = tmp_path / "m"
    make_tiny_model("llama", folder)
    engine = _make_engine(folder, chunked_prefill_size=8)
    notices = []

    def on_kv_computed(notice):
        seq = engine._requests[notice.request_id].seq
        notices.append((notice, list(seq.output_token_ids), seq.num_uncomputed_tokens))

    engine.on_kv_computed = on_kv_computed
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    engine.add_request("kept", list(range(21)), greedy, keep_kv=True)  # 3 chunks of <= 8
    engine.add_request("plain", list(range(5)), greedy)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    (kept,) = [o for o in outputs if o.request_id == "kept"]
    ((notice, sampled_before, uncomputed),) = notices
    assert notice.request_id == "kept" and notice.page_ids == kept.kv_page_ids
    assert len(notice.page_ids) == 6 and notice.ready_event == b""
    assert sampled_before == [] and uncomputed == 0
    assert engine.release_kv("kept") and engine._kv_events.num_held == 0
    assert engine.kv.num_held_pages == 0
