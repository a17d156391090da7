"""What a user of `LLMEngine` sees: stop strings, stop tokens, EOS, length limits, seeds, logprobs.

Everything runs on a tiny random Llama with a byte-level tokenizer (token id == byte value), so
expected outputs are derived from a greedy run of the same engine, never hard-coded.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.loader import LoadedModel, load_model
from services.engine.output import RequestOutput
from services.engine.sampling_params import SamplingParams
from tests.tiny_models import EOS_ID, make_tiny_model

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello world, this is a test.", "The cat", "1 2 3", "xyz", "a", "b", "Paris is"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf = make_tiny_model("llama", folder)
    return folder, hf


@pytest.fixture(scope="module")
def loaded(tiny) -> LoadedModel:
    return load_model(str(tiny[0]))


def _make_engine(loaded: LoadedModel, **overrides) -> LLMEngine:
    config = EngineConfig(**{"page_size": 4, "num_pages": 256, **overrides})
    return LLMEngine(loaded.model, loaded.tokenizer, config)


def _greedy(loaded: LoadedModel, prompt: list[int], max_tokens: int = 64) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    (result,) = _make_engine(loaded).generate([prompt], params)
    return result.token_ids


def _stream(engine: LLMEngine, request_id: str, prompt: list[int],
            params: SamplingParams) -> list[RequestOutput]:
    """Every delta `step()` returns for one request, run alone to completion."""
    engine.add_request(request_id, prompt, params)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def _check_stream_shape(outputs: list[RequestOutput], reason: str) -> None:
    assert outputs[-1].finished and outputs[-1].finish_reason == reason
    assert all(not o.finished and o.finish_reason is None for o in outputs[:-1])
    assert [o.num_output_tokens for o in outputs] == list(range(1, len(outputs) + 1))


def _ids(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def _text(outputs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outputs)


# --- stop strings ------------------------------------------------------------------------------


def _prompt_with_printable_run(loaded: LoadedModel, size: int = 3) -> tuple[list[int], list[int],
                                                                           int]:
    """A prompt whose greedy output has `size` printable ASCII tokens in a row (not at the start):
    (prompt, greedy output, index of the run)."""
    for text in PROMPTS:
        prompt = loaded.tokenizer.encode(text)
        greedy = _greedy(loaded, prompt)
        for i in range(2, len(greedy) - size):
            if all(33 <= t < 127 for t in greedy[i : i + size]):
                return prompt, greedy, i
    raise AssertionError("no greedy output with a printable run; pick other prompts")


def test_stop_string_spanning_tokens_ends_text_before_it(loaded):
    tok = loaded.tokenizer
    prompt, greedy, at = _prompt_with_printable_run(loaded)
    stop = bytes(greedy[at : at + 3]).decode()
    full = tok.decode(greedy)
    # generation ends at the token that completes the first occurrence of the stop string
    end = next(n for n in range(1, len(greedy) + 1) if stop in tok.decode(greedy[:n]))
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True,
                            stop=("never-there", stop))

    outputs = _stream(_make_engine(loaded), "s", prompt, params)

    _check_stream_shape(outputs, "stop")
    assert _ids(outputs) == greedy[:end]
    assert _text(outputs) == full[: full.index(stop)]
    assert stop not in _text(outputs)
    (result,) = _make_engine(loaded).generate([prompt], params)
    assert (result.text, result.token_ids, result.finish_reason) == (
        _text(outputs), greedy[:end], "stop")


def test_text_held_back_for_a_possible_stop_string_is_released_at_the_end(loaded):
    tok = loaded.tokenizer
    prompt, greedy, at = _prompt_with_printable_run(loaded)
    # the output's last printable character starts a stop string that never completes
    partial = bytes(greedy[at : at + 1]).decode()
    params = SamplingParams(max_tokens=at + 1, temperature=0.0, ignore_eos=True,
                            stop=(partial + "\x00\x00",))

    outputs = _stream(_make_engine(loaded), "s", prompt, params)

    _check_stream_shape(outputs, "length")
    assert _ids(outputs) == greedy[: at + 1]
    assert _text(outputs) == tok.decode(greedy[: at + 1])
    assert outputs[-1].new_text.endswith(partial)


def test_length_finish_keeps_a_trailing_incomplete_byte_sequence(loaded):
    """Concatenated deltas equal the decode of all output tokens, even when the last tokens are
    bytes of an unfinished UTF-8 character (the detokenizer holds them until the end)."""
    tok = loaded.tokenizer
    prompt = tok.encode(PROMPTS[0])
    greedy = _greedy(loaded, prompt)
    cut = next(n for n in range(1, len(greedy)) if tok.decode(greedy[:n]).endswith("\ufffd"))

    outputs = _stream(_make_engine(loaded), "s", prompt,
                      SamplingParams(max_tokens=cut, temperature=0.0, ignore_eos=True))

    assert _ids(outputs) == greedy[:cut]
    assert _text(outputs) == tok.decode(greedy[:cut])


# --- stop tokens, EOS, length ------------------------------------------------------------------


def test_eos_finishes_with_stop_unless_ignored(loaded):
    tok = loaded.tokenizer
    for text in [*PROMPTS, *"abcdefghij"]:
        prompt = tok.encode(text)
        greedy = _greedy(loaded, prompt, max_tokens=32)
        if EOS_ID in greedy:
            break
    else:
        raise AssertionError("no prompt whose greedy output reaches EOS; pick other prompts")
    k = greedy.index(EOS_ID)

    outputs = _stream(_make_engine(loaded), "e", prompt,
                      SamplingParams(max_tokens=32, temperature=0.0))

    _check_stream_shape(outputs, "stop")
    assert _ids(outputs) == greedy[: k + 1]
    assert _text(outputs) == tok.decode(greedy[:k])
    assert "<|im_end|>" not in _text(outputs)


def test_stop_token_id_finishes_with_stop_and_is_not_in_the_text(loaded):
    tok = loaded.tokenizer
    prompt = tok.encode(PROMPTS[0])
    greedy = _greedy(loaded, prompt)
    k = next(i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i])

    outputs = _stream(_make_engine(loaded), "t", prompt,
                      SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True,
                                     stop_token_ids=(greedy[k],)))

    _check_stream_shape(outputs, "stop")
    assert _ids(outputs) == greedy[: k + 1]
    assert _text(outputs) == tok.decode(greedy[:k])


def test_max_tokens_gives_exactly_that_many_tokens(loaded):
    engine = _make_engine(loaded)
    prompts = [loaded.tokenizer.encode(t) for t in PROMPTS[:3]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (1, 7, 20)]
    results = engine.generate(prompts, params)
    assert [len(r.token_ids) for r in results] == [1, 7, 20]
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert results[2].token_ids == _greedy(loaded, prompts[2], max_tokens=20)


def test_max_model_len_finishes_with_length_when_the_context_fills(loaded):
    engine = _make_engine(loaded, max_model_len=16)
    assert engine.max_model_len == 16
    long_params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    prompts = [list(b"0123456789"), list(b"abcdefghijklmno")]  # 10 and 15 tokens
    results = engine.generate(prompts, long_params)
    assert [len(r.token_ids) for r in results] == [6, 1]  # prompt + output == 16
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert results[0].token_ids == _greedy(loaded, prompts[0], max_tokens=6)


def test_a_sequence_never_outgrows_the_kv_pool(loaded):
    engine = _make_engine(loaded, num_pages=8)  # 32 tokens
    (result,) = engine.generate([list(b"0123456789")],
                                SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert (len(result.token_ids), result.finish_reason) == (22, "length")
    assert engine.kv.num_held_pages == 0


# --- seeds -------------------------------------------------------------------------------------


def _sampled(seed: int | None, max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True)


def test_same_seed_same_tokens_alone_and_batched(loaded):
    tok = loaded.tokenizer
    prompt = tok.encode(PROMPTS[0])
    others = [tok.encode(t) for t in PROMPTS[1:4]]
    (alone,) = _make_engine(loaded).generate([prompt], _sampled(1234))
    assert alone.token_ids != _greedy(loaded, prompt, max_tokens=40)  # it really samples

    batched = _make_engine(loaded).generate(
        [others[0], prompt, others[1], prompt, others[2]],
        [_sampled(None), _sampled(1234), _sampled(99), _sampled(1234),
         SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)],
    )
    assert batched[1].token_ids == alone.token_ids
    assert batched[3].token_ids == alone.token_ids

    # chunked prefill and preemption (recompute) do not change a seeded request's tokens
    tight = _make_engine(loaded, num_pages=24, chunked_prefill_size=8, enable_prefix_cache=False)
    results = tight.generate([prompt] * 4 + others, _sampled(1234))
    assert tight.scheduler.num_preemptions > 0
    assert all(r.token_ids == alone.token_ids for r in results[:4])


def test_different_seeds_give_different_tokens(loaded):
    prompt = loaded.tokenizer.encode(PROMPTS[0])
    results = _make_engine(loaded).generate([prompt] * 3, [_sampled(1), _sampled(2), _sampled(3)])
    assert len({tuple(r.token_ids) for r in results}) == 3


# --- logprobs ----------------------------------------------------------------------------------


def test_logprobs_equal_log_softmax_of_transformers_logits(tiny, loaded):
    _, hf = tiny
    prompt = loaded.tokenizer.encode(PROMPTS[0])
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    sampled = SamplingParams(max_tokens=12, temperature=0.7, seed=5, ignore_eos=True, logprobs=3)
    results = _make_engine(loaded).generate([prompt, prompt], [greedy, sampled])
    for i, result in enumerate(results):
        assert len(result.logprobs) == len(result.token_ids) == 12
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + result.token_ids[:-1]])).logits[0, len(prompt) - 1:]
        ref = torch.log_softmax(logits, dim=-1)  # [12, vocab]; raw, before temperature
        for row, token_id, lp in zip(ref, result.token_ids, result.logprobs, strict=True):
            top = row.topk(3)
            assert lp.token_id == token_id
            assert lp.logprob == pytest.approx(row[token_id].item(), abs=1e-3)
            assert lp.top_token_ids == top.indices.tolist()
            assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-3)
            assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
            if i == 0:
                assert lp.top_token_ids[0] == token_id


def test_no_logprobs_unless_asked(loaded):
    prompt = loaded.tokenizer.encode(PROMPTS[1])
    plain, zero = _make_engine(loaded).generate(
        [prompt, prompt], [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                           SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                          logprobs=0)])
    assert plain.logprobs == []
    assert [lp.token_id for lp in zero.logprobs] == zero.token_ids
    assert all(lp.top_token_ids == [] for lp in zero.logprobs)
