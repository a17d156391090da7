"""`tandem generate` as a user runs it: output formats, prompt files, and refusals (status 2, one
line, no traceback). In-process on a tiny random model, plus two real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.engine import EngineConfig, LLMEngine
from services.engine.generate_cli import main
from services.engine.loader import load_model
from services.engine.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model

RECORD_KEYS = {"id", "text", "token_ids", "prompt_token_ids", "finish_reason"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llama")
    make_tiny_model("llama", folder)
    return str(folder)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _write_jsonl(path: Path, items: list[dict | str]) -> str:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return str(path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_prints_one_object_equal_to_the_engine(capsys, model_path):
    rc, out, err = _run(capsys, "--model-path", model_path, "--prompt", "Hello", "--max-tokens",
                        "8", "--ignore-eos", "--json")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == RECORD_KEYS
    loaded = load_model(model_path)
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig())
    (expected,) = engine.generate([list(b"Hello")],
                                  SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert record["prompt_token_ids"] == list(b"Hello")
    assert record["token_ids"] == expected.token_ids and len(expected.token_ids) == 8
    assert record["text"] == expected.text
    assert record["finish_reason"] == "length"


def test_plain_prints_the_text_and_chat_wraps_the_prompt(capsys, model_path):
    common = ["--model-path", model_path, "--prompt", "Hi", "--max-tokens", "6", "--ignore-eos"]
    rc, out, _ = _run(capsys, *common, "--json")
    record = json.loads(out)
    rc_plain, plain, _ = _run(capsys, *common)
    assert (rc, rc_plain) == (0, 0)
    assert plain == record["text"] + "\n"

    _, chat_out, _ = _run(capsys, *common, "--chat", "--json")
    chat = json.loads(chat_out)
    tok = load_model(model_path).tokenizer
    assert chat["prompt_token_ids"] == tok.encode_chat([{"role": "user", "content": "Hi"}],
                                                       add_generation_prompt=True)
    assert chat["prompt_token_ids"] != record["prompt_token_ids"]


def test_prompts_file_writes_one_object_per_line_in_order_equal_to_runs_alone(
        capsys, model_path, tmp_path):
    items = [
        {"prompt": "Hello world", "id": "first"},
        {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 3},
        {"prompt": "abc", "temperature": 1.0, "seed": 7, "max_tokens": 10},
        {"prompt": "xyz", "logprobs": 2},
        {"prompt": "The cat", "stop": ["\n", "a"], "stop_token_ids": [10]},
    ]
    prompts = _write_jsonl(tmp_path / "in.jsonl", [items[0], items[1], "", *items[2:]])
    common = ["--model-path", model_path, "--max-tokens", "12", "--ignore-eos"]
    rc, out, err = _run(capsys, *common, "--prompts-file", prompts,
                        "--output", str(tmp_path / "out.jsonl"))
    assert (rc, out, err) == (0, "", "")

    records = _read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == ["first", 1, 2, 3, 4]
    assert all(RECORD_KEYS <= set(r) for r in records)
    assert records[0]["prompt_token_ids"] == list(b"Hello world")
    assert len(records[0]["token_ids"]) == 12
    assert len(records[1]["token_ids"]) == 3
    assert (len(records[2]["token_ids"]), records[2]["finish_reason"]) == (10, "length")
    assert [len(lp["top"]) for lp in records[3]["logprobs"]] == [2] * 12
    assert [lp["token_id"] for lp in records[3]["logprobs"]] == records[3]["token_ids"]
    for i, item in enumerate(items):
        alone = _write_jsonl(tmp_path / f"alone{i}.jsonl", [item])
        rc, out, _ = _run(capsys, *common, "--prompts-file", alone)
        assert rc == 0
        (record,) = [json.loads(line) for line in out.splitlines()]
        batched = dict(records[i])
        # logprobs of a batched row differ from a lone row's in the last float bits
        assert _flat_logprobs(record.pop("logprobs", [])) == pytest.approx(
            _flat_logprobs(batched.pop("logprobs", [])), abs=1e-4)
        assert {**record, "id": batched["id"]} == batched


def _flat_logprobs(logprobs: list[dict]) -> list[float]:
    """Token ids and logprobs, in order, as one list of numbers."""
    flat: list[float] = []
    for lp in logprobs:
        flat += [lp["token_id"], lp["logprob"]]
        for token_id, logprob in lp["top"].items():
            flat += [int(token_id), logprob]
    return flat


@pytest.mark.parametrize("args, words", [
    (["--prompt", ""], ["prompt is empty"]),
    (["--prompt", "   "], ["prompt is empty"]),
    (["--prompt", "hi", "--max-tokens", "-1"], ["max_tokens", "-1"]),
    (["--prompt", "hi", "--top-p", "1.5"], ["top_p", "1.5"]),
    (["--prompt", "hi", "--top-p", "0"], ["top_p"]),
    (["--prompt", "hi", "--temperature", "-1"], ["temperature"]),
    (["--prompt", "x" * 40, "--max-model-len", "16"], ["40 tokens", "16"]),
    (["--prompt", "hi", "--num-kv-pages", "0"], ["--num-kv-pages"]),
])
def test_bad_flags_exit_2_with_one_line(capsys, model_path, args, words):
    rc, out, err = _run(capsys, "--model-path", model_path, *args)
    _check_refusal(rc, out, err, words)


def _check_refusal(rc: int, out: str, err: str, words: list[str]) -> None:
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tandem generate: error: ")
    for word in words:
        assert word in lines[0]


def test_unknown_model_path_exits_2_naming_it(capsys, tmp_path):
    missing = str(tmp_path / "nowhere")
    rc, out, err = _run(capsys, "--model-path", missing, "--prompt", "hi")
    _check_refusal(rc, out, err, [missing])


@pytest.mark.parametrize("lines, words", [
    ([{"prompt": "ok"}, "{not json"], [":2:", "not valid JSON"]),
    ([{"prompt": "ok"}, "", {"id": 3}], [":3:", "'prompt', 'messages'"]),
    (["[1, 2]"], [":1:"]),
    ([{"prompt": "a", "messages": []}], [":1:"]),
    ([""], ["no prompts"]),
    ([{"prompt": "ok"}, {"prompt": "a", "top_p": 2}], ["top_p"]),
    ([{"prompt": "ok"}, {"prompt": 5}], ["prompt 1", "string"]),
])
def test_bad_prompts_file_exits_2_naming_the_line(capsys, model_path, tmp_path, lines, words):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    rc, out, err = _run(capsys, "--model-path", model_path, "--prompts-file", path)
    _check_refusal(rc, out, err, words)
    if any(":" in w and w.strip(":").isdigit() for w in words):
        assert path in err


def test_missing_prompts_file_exits_2(capsys, model_path, tmp_path):
    missing = str(tmp_path / "absent.jsonl")
    rc, out, err = _run(capsys, "--model-path", model_path, "--prompts-file", missing)
    _check_refusal(rc, out, err, [missing])


def _tandem() -> str:
    script = Path(sys.executable).with_name("tandem")
    assert script.is_file(), f"the tandem console script is not installed next to {sys.executable}"
    return str(script)


def test_console_script_refuses_bad_flags_without_traceback(model_path):
    proc = subprocess.run([_tandem(), "generate", "--model-path", model_path, "--prompt", "hi",
                           "--top-p", "1.5"], capture_output=True, text=True, timeout=60)
    _check_refusal(proc.returncode, proc.stdout, proc.stderr, ["top_p"])


@pytest.mark.slow
def test_console_script_answers_with_the_embedded_model():
    proc = subprocess.run([_tandem(), "generate", "--prompt", "What is the capital of France?",
                           "--chat", "--max-tokens", "20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
