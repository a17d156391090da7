"""Requests ending from outside, refused input and page accounting, through `LLMEngine`'s public
API; and `load_model`'s refusals. Tiny random Llama, byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.engine.engine import EngineConfig, EngineInputError, LLMEngine
from services.engine.loader import LoadedModel, ModelPathError, load_model
from services.engine.output import RequestOutput
from services.engine.sampling_params import SamplingParams
from tests.tiny_models import VOCAB_SIZE, make_tiny_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SHORT = list(b"short")
MEDIUM = list(b"a medium prompt")
LONG = list(b"a rather long prompt, longer than a few chunks")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", folder)
    return load_model(str(folder))


def _make_engine(loaded: LoadedModel, **overrides) -> LLMEngine:
    config = EngineConfig(**{"page_size": 4, "num_pages": 256, **overrides})
    return LLMEngine(loaded.model, loaded.tokenizer, config)


def _alone(loaded: LoadedModel, prompt: list[int], **overrides) -> list[int]:
    (result,) = _make_engine(loaded, **overrides).generate([prompt], GREEDY)
    return result.token_ids


def _drain(engine: LLMEngine, outputs: dict[str, list[int]]) -> None:
    """Step until nothing is left, appending each request's tokens to `outputs`."""
    for _ in range(1000):
        if not engine.has_unfinished():
            return
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("engine did not finish in 1000 steps")


def _check_aborted(output: RequestOutput | None, request_id: str, num_output_tokens: int) -> None:
    assert output is not None
    assert (output.request_id, output.finished, output.finish_reason) == (request_id, True,
                                                                          "abort")
    assert output.new_token_ids == [] and output.new_text == ""
    assert output.num_output_tokens == num_output_tokens


# --- abort -------------------------------------------------------------------------------------


def test_abort_while_queued(loaded):
    engine = _make_engine(loaded, max_running_requests=1)
    engine.add_request("a", SHORT, GREEDY)
    engine.add_request("b", MEDIUM, GREEDY)
    outputs: dict[str, list[int]] = {}
    for o in engine.step():  # "a" runs, "b" waits for a slot
        outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert "b" not in outputs

    _check_aborted(engine.abort("b"), "b", 0)
    _drain(engine, outputs)

    assert outputs == {"a": _alone(loaded, SHORT)}
    assert engine.kv.num_held_pages == 0


def test_abort_mid_chunked_prefill_frees_its_pages(loaded):
    engine = _make_engine(loaded, chunked_prefill_size=4)
    engine.add_request("short", SHORT, GREEDY)
    engine.add_request("long", LONG, GREEDY)
    outputs: dict[str, list[int]] = {}
    for _ in range(3):  # "long" gets a few tokens of its prompt per step, never all
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert "long" not in outputs
    held = engine.kv.num_held_pages

    _check_aborted(engine.abort("long"), "long", 0)
    assert engine.kv.num_held_pages < held
    _drain(engine, outputs)

    assert outputs == {"short": _alone(loaded, SHORT)}
    assert engine.kv.num_held_pages == 0


def test_abort_while_decoding_leaves_the_others_unaffected(loaded):
    engine = _make_engine(loaded, chunked_prefill_size=8)
    prompts = {"a": SHORT, "victim": MEDIUM, "c": LONG}
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, GREEDY)
    outputs: dict[str, list[int]] = {}
    while len(outputs.get("victim", [])) < 3:
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    victim_tokens = outputs.pop("victim")

    _check_aborted(engine.abort("victim"), "victim", len(victim_tokens))
    assert engine.abort("victim") is None
    _drain(engine, outputs)

    assert victim_tokens == _alone(loaded, MEDIUM)[: len(victim_tokens)]
    assert outputs == {"a": _alone(loaded, SHORT), "c": _alone(loaded, LONG)}
    assert engine.kv.num_held_pages == 0


def test_abort_of_an_unknown_or_finished_request_returns_none(loaded):
    engine = _make_engine(loaded)
    assert engine.abort("nobody") is None
    engine.add_request("done", SHORT, SamplingParams(max_tokens=2, ignore_eos=True))
    _drain(engine, {})
    assert engine.abort("done") is None
    assert not engine.has_unfinished()


# --- refused input -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, prompt, words", [
    ({}, [], ["empty"]),
    ({"max_model_len": 16}, list(range(65, 81)), ["16 tokens", "context is 16"]),
    ({"max_model_len": 16}, list(range(65, 85)), ["20 tokens", "context is 16"]),
    ({}, [65, VOCAB_SIZE, 66], [str(VOCAB_SIZE), f"[{VOCAB_SIZE}]"]),
    ({}, [65, -1], ["[-1]"]),
    ({"num_pages": 3}, list(range(65, 77)), ["12 tokens", "at most 12 tokens"]),
])
def test_bad_prompt_raises_and_changes_nothing(loaded, overrides, prompt, words):
    engine = _make_engine(loaded, **overrides)
    engine.add_request("keep", SHORT, GREEDY)
    outputs: dict[str, list[int]] = {}
    for o in engine.step():
        outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    held = engine.kv.num_held_pages

    with pytest.raises(EngineInputError) as info:
        engine.add_request("bad", prompt, GREEDY)

    for word in words:
        assert word in str(info.value)
    assert engine.num_unfinished == 1
    assert engine.kv.num_held_pages == held
    assert engine.abort("bad") is None
    _drain(engine, outputs)
    assert outputs == {"keep": _alone(loaded, SHORT, **overrides)}
    engine.add_request("bad", SHORT, GREEDY)  # the refused id was never taken
    _drain(engine, outputs)
    assert engine.kv.num_held_pages == 0


def test_duplicate_request_id_is_refused_and_the_first_request_runs_on(loaded):
    engine = _make_engine(loaded)
    engine.add_request("x", SHORT, GREEDY)
    with pytest.raises(EngineInputError, match="'x'"):
        engine.add_request("x", MEDIUM, GREEDY)
    assert engine.num_unfinished == 1
    outputs: dict[str, list[int]] = {}
    _drain(engine, outputs)
    assert outputs == {"x": _alone(loaded, SHORT)}
    engine.add_request("x", MEDIUM, GREEDY)  # free again once finished
    _drain(engine, outputs := {})
    assert outputs == {"x": _alone(loaded, MEDIUM)}


def test_stop_strings_without_a_tokenizer_are_refused(loaded):
    engine = LLMEngine(loaded.model, None, EngineConfig(page_size=4, num_pages=64))
    with pytest.raises(EngineInputError, match="tokenizer"):
        engine.add_request("s", SHORT, SamplingParams(stop=("x",)))
    assert not engine.has_unfinished()


def test_generate_refuses_a_params_list_of_the_wrong_length(loaded):
    engine = _make_engine(loaded)
    with pytest.raises(EngineInputError, match="2 prompts but 1 params"):
        engine.generate([SHORT, MEDIUM], [GREEDY])
    assert not engine.has_unfinished()


def test_generate_with_one_bad_prompt_frees_the_ones_already_added(loaded):
    engine = _make_engine(loaded, max_model_len=32)
    with pytest.raises(EngineInputError):
        engine.generate([SHORT, MEDIUM, list(range(65, 105))], GREEDY)
    assert not engine.has_unfinished()
    assert engine.kv.num_held_pages == 0


# --- page accounting ---------------------------------------------------------------------------


def test_every_page_is_given_back_after_a_mixed_workload(loaded):
    shared = list(b"a shared system prompt of some length: ")
    prompts = [SHORT, MEDIUM, LONG, shared + list(b"one"), shared + list(b"two, longer"),
               shared + list(b"one"), list(b"x"), LONG + LONG]
    params = [
        GREEDY,
        SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, logprobs=2),
        SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True, stop_token_ids=(10, 32)),
        SamplingParams(max_tokens=40, temperature=0.0, stop=("e", "a")),
        SamplingParams(max_tokens=1),
        SamplingParams(max_tokens=25, temperature=0.0, repetition_penalty=1.3),
    ]
    for overrides in ({}, {"chunked_prefill_size": 6}, {"num_pages": 40},
                      {"enable_prefix_cache": False, "num_pages": 40}):
        engine = _make_engine(loaded, **overrides)
        first = engine.generate(prompts, params)
        engine.add_request("aborted", LONG, GREEDY)
        engine.step()
        second = engine.generate(prompts, params)  # "aborted" runs alongside, then is aborted
        engine.abort("aborted")
        assert all(r.finish_reason in ("stop", "length") for r in first + second)
        assert not engine.has_unfinished()
        assert engine.kv.num_held_pages == 0, overrides
        if overrides.get("enable_prefix_cache", True) and "num_pages" not in overrides:
            assert second[4].num_cached_tokens >= len(shared) // 4 * 4
            assert [r.token_ids for r in second[:2]] == [r.token_ids for r in first[:2]]


# --- loader ------------------------------------------------------------------------------------


def test_load_model_refuses_a_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelPathError, match="no such file or folder") as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)


def test_load_model_refuses_a_folder_without_a_model(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelPathError, match="no config.json and no .gguf") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_load_model_refuses_a_folder_with_two_ggufs(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        Path(tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelPathError, match="several .gguf files") as info:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"attention_backend": "triton"}, "needs a CUDA device"),
    ({"attention_backend": "flashinfer"}, "--attention-backend must be one of"),
    ({"cuda_graph_max_bs": 0}, "--cuda-graph-max-bs must be >= 1"),
])
def test_gpu_only_or_unknown_engine_options_are_refused_on_cpu(loaded, overrides, words):
    with pytest.raises(ValueError, match=words):
        _make_engine(loaded, **overrides)
