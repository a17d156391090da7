"""Workload generation: random lengths and seeds, ShareGPT parsing, arrival times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.bench.runner import arrival_times
from services.bench.workload import (
    WORDS,
    WorkloadError,
    load_sharegpt,
    random_requests,
    sharegpt_requests,
)


def _write(tmp_path: Path, data: object, name: str = "sharegpt.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _conversation(*turns: tuple[str, str]) -> dict:
    return {"id": "x", "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_random_lengths_stay_in_range_and_prompts_have_that_many_words():
    requests = random_requests(200, input_len=100, output_len=40, range_ratio=0.5, seed=3)
    assert len(requests) == 200
    assert all(50 <= r.prompt_len <= 100 for r in requests)
    assert all(20 <= r.output_len <= 40 for r in requests)
    # lengths spread over the range, not stuck at one end
    assert min(r.prompt_len for r in requests) < 60 and max(r.prompt_len for r in requests) > 90
    for r in requests:
        words = r.prompt.split(" ")
        assert len(words) == r.prompt_len
        assert set(words) <= set(WORDS)


def test_random_ratio_one_gives_exact_lengths_and_zero_reaches_one():
    exact = random_requests(20, input_len=64, output_len=8, range_ratio=1.0, seed=0)
    assert {(r.prompt_len, r.output_len) for r in exact} == {(64, 8)}
    wide = random_requests(300, input_len=4, output_len=4, range_ratio=0.0, seed=0)
    assert {r.prompt_len for r in wide} == {1, 2, 3, 4}


def test_random_same_seed_same_requests_other_seed_differs():
    a = random_requests(10, 50, 10, 0.5, seed=7)
    assert a == random_requests(10, 50, 10, 0.5, seed=7)
    assert a != random_requests(10, 50, 10, 0.5, seed=8)
    assert len({r.prompt for r in a}) == 10


@pytest.mark.parametrize("kwargs, flag", [
    ({"input_len": 0}, "--random-input-len"),
    ({"output_len": 0}, "--random-output-len"),
    ({"range_ratio": 1.5}, "--random-range-ratio"),
])
def test_random_rejects_bad_lengths_naming_the_flag(kwargs, flag):
    args = {"num_prompts": 2, "input_len": 8, "output_len": 8, "range_ratio": 0.5, "seed": 0}
    with pytest.raises(WorkloadError, match=flag):
        random_requests(**{**args, **kwargs})


def test_sharegpt_takes_first_human_turn_and_the_reply_after_it(tmp_path):
    path = _write(tmp_path, [
        _conversation(("gpt", "hello there"), ("human", "What is 2+2?"), ("gpt", "x" * 40),
                      ("human", "and 3+3?"), ("gpt", "6")),
        _conversation(("human", "only a question")),                 # no reply: skipped
        _conversation(("human", "a" * 80), ("gpt", "b" * 12)),
    ])
    assert load_sharegpt(path) == [("What is 2+2?", "x" * 40), ("a" * 80, "b" * 12)]
    requests = sharegpt_requests(path, num_prompts=10, output_len=None, seed=0)
    by_prompt = {r.prompt: r for r in requests}
    assert len(requests) == 2
    assert by_prompt["a" * 80].prompt_len == 20 and by_prompt["a" * 80].output_len == 3
    assert by_prompt["What is 2+2?"].output_len == 10


def test_sharegpt_output_len_override_num_prompts_and_seed(tmp_path):
    path = _write(tmp_path, [_conversation(("human", f"question {i}"), ("gpt", "answer"))
                             for i in range(20)])
    first = sharegpt_requests(path, num_prompts=5, output_len=17, seed=1)
    assert len(first) == 5 and {r.output_len for r in first} == {17}
    assert first == sharegpt_requests(path, num_prompts=5, output_len=17, seed=1)
    assert first != sharegpt_requests(path, num_prompts=5, output_len=17, seed=2)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ({"conversations": []}, "expected a JSON list"),
    ([{"no_conversations": 1}], "entry 0: expected an object with a \"conversations\" list"),
    ([_conversation(("human", "q"), ("gpt", "a")), "text"], "entry 1"),
    ([{"conversations": [{"from": "human", "value": 3}]}], "string \"value\""),
    ([_conversation(("gpt", "a"), ("human", "q"))], "no conversation has a human turn"),
])
def test_sharegpt_malformed_file_is_a_clear_error(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(WorkloadError, match=message) as info:
        sharegpt_requests(path, num_prompts=3, output_len=None, seed=0)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_sharegpt_missing_file(tmp_path):
    with pytest.raises(WorkloadError, match="cannot read"):
        load_sharegpt(tmp_path / "absent.json")


def test_arrival_times_all_at_once_for_infinite_rate():
    assert arrival_times(5, float("inf"), seed=0) == [0.0] * 5


def test_arrival_times_are_poisson_at_the_asked_rate():
    times = arrival_times(4000, request_rate=10.0, seed=5)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(0.1, rel=0.06)
    # exponential gaps: the standard deviation equals the mean
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std == pytest.approx(mean, rel=0.1)
    assert times == arrival_times(4000, 10.0, seed=5)
    assert times != arrival_times(4000, 10.0, seed=6)
