"""`tandem bench` against a real HTTP server: a fake OpenAI-style SSE server defined here, run as
its own process (`python -m tests.bench.test_bench_client --port P --log F`).

The fake streams `max_tokens` tokens, one per chunk: the chat role chunk at once, the first token
after TTFT_S, then one every ITL_S, then a usage chunk (when asked) and `[DONE]`. Its
prompt_tokens is the prompt's word count + CHAT_OVERHEAD for chat, so a report that used the
client's estimate instead would be caught. Markers in the prompt: FAIL -> HTTP 500, PAIRS -> two
tokens per chunk, CUT -> the stream stops after one token without [DONE], NOUSAGE -> no usage,
BADCHUNK -> a chunk whose choices are not a list.
Each POST body is appended to the log file, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.bench.__main__ import main
from services.bench.client import RequestRecord, StreamSettings, stream_request
from services.bench.runner import make_client
from services.bench.workload import BenchRequest
from tests.procs import free_port, stop

API_KEY = "sk-bench-test"
MODEL = "fake-model"
TTFT_S = 0.15
ITL_S = 0.05
CHAT_OVERHEAD = 3
REPO = Path(__file__).resolve().parents[2]


# ---- the fake server (runs in its own process) ----

def _make_app(log_path: str) -> FastAPI:
    app = FastAPI()

    def _error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "error", "code": status}},
                            status_code=status)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/v1/models")
    async def models(request: Request):
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return _error(401, "bad api key")
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def generate(request: Request, is_chat: bool):
        body = await request.json()
        with open(log_path, "a") as log:
            log.write(json.dumps(body) + "\n")
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return _error(401, "bad api key")
        prompt = body["messages"][0]["content"] if is_chat else body["prompt"]
        if "FAIL" in prompt:
            return _error(500, "injected failure")
        num_tokens = body["max_tokens"]
        per_chunk = 2 if "PAIRS" in prompt else 1
        usage = {"prompt_tokens": len(prompt.split()) + (CHAT_OVERHEAD if is_chat else 0),
                 "completion_tokens": num_tokens, "total_tokens": 0}

        def chunk(text: str | None, **extra) -> str:
            if text is None:
                choices = []
            elif is_chat:
                choices = [{"index": 0, "delta": {"content": text}, "finish_reason": None}]
            else:
                choices = [{"index": 0, "text": text, "finish_reason": None}]
            return f"data: {json.dumps({'id': 'x', 'choices': choices, **extra})}\n\n"

        async def events():
            if is_chat:
                yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {
                    "role": "assistant", "content": ""}}]}) + "\n\n")
            await asyncio.sleep(TTFT_S)
            if "BADCHUNK" in prompt:
                yield 'data: {"choices": "oops"}\n\n'
            sent = 0
            while sent < num_tokens:
                if sent:
                    await asyncio.sleep(ITL_S)
                k = min(per_chunk, num_tokens - sent)
                yield chunk("tok " * k)
                sent += k
                if "CUT" in prompt:
                    return
            if body.get("stream_options", {}).get("include_usage") and "NOUSAGE" not in prompt:
                yield chunk(None, usage=usage)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, is_chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, is_chat=False)

    return app


def _serve(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args(argv)
    uvicorn.run(_make_app(a.log), host="127.0.0.1", port=a.port, log_level="warning")


# ---- fixtures and helpers ----

class FakeServer:
    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def bodies(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake_openai")
    port, log = free_port(), tmp / "requests.jsonl"
    log.touch()
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.test_bench_client", "--port",
                             str(port), "--log", str(log)], cwd=REPO,
                            stdout=open(tmp / "server.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (tmp / "server.log").read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.05)
    yield FakeServer(url, log)
    stop(proc)


def _stream(server: FakeServer, prompt: str, output_len: int, *, is_chat: bool = True,
            api_key: str = API_KEY, timeout_s: float = 10.0) -> RequestRecord:
    path = "/v1/chat/completions" if is_chat else "/v1/completions"
    settings = StreamSettings(url=server.url + path, is_chat=is_chat, model=MODEL,
                              api_key=api_key, timeout_s=timeout_s, ignore_eos=True)
    request = BenchRequest(prompt=prompt, prompt_len=len(prompt.split()), output_len=output_len)

    async def run() -> RequestRecord:
        async with make_client(timeout_s) as client:
            return await stream_request(client, settings, request, 0, time.perf_counter())
    return asyncio.run(run())


def _sharegpt(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": p},
                                                   {"from": "gpt", "value": "an answer"}]}
                                for p in prompts]))
    return path


# ---- the client ----

def test_chat_stream_records_ttft_itl_and_usage(server):
    record = _stream(server, "one two three four", 4)
    assert record.error is None
    assert TTFT_S <= record.ttft_s < TTFT_S + 0.5      # the role-only chunk does not count
    assert len(record.itl_s) == 3
    assert all(0.8 * ITL_S <= gap < ITL_S + 0.5 for gap in record.itl_s)
    assert record.e2e_s >= record.ttft_s + sum(record.itl_s)
    assert (record.num_chunks, record.output_tokens) == (4, 4)
    assert record.prompt_tokens == 4 + CHAT_OVERHEAD and record.is_usage_reported
    body = server.bodies()[-1]
    assert body["max_tokens"] == 4 and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0


def test_completions_chunk_with_two_tokens_counts_one_gap(server):
    record = _stream(server, "PAIRS of tokens", 5, is_chat=False)
    assert record.error is None
    assert record.num_chunks == 3 and len(record.itl_s) == 2  # 2 + 2 + 1 tokens
    assert record.output_tokens == 5 and record.prompt_tokens == 3
    assert server.bodies()[-1]["prompt"] == "PAIRS of tokens"


def test_http_error_is_recorded_with_status_and_message(server):
    record = _stream(server, "please FAIL", 4)
    assert record.error == "HTTP 500: injected failure"
    assert record.ttft_s is None and record.output_tokens == 0
    assert _stream(server, "hello", 2, api_key="wrong").error == "HTTP 401: bad api key"


def test_truncated_stream_and_missing_usage(server):
    cut = _stream(server, "CUT short", 4)
    assert cut.error == "stream ended without data: [DONE]" and cut.num_chunks == 1
    no_usage = _stream(server, "NOUSAGE here", 3)
    assert no_usage.error is None and not no_usage.is_usage_reported
    assert no_usage.output_tokens == 3 and no_usage.prompt_tokens is None
    bad = _stream(server, "BADCHUNK", 2)
    assert bad.error == "malformed SSE chunk: '{\"choices\": \"oops\"}'"


def test_per_request_timeout(server):
    record = _stream(server, "slow", 4, timeout_s=0.05)
    assert record.error == "timeout after 0.05s" and record.ttft_s is None


# ---- the command ----

def test_main_counts_failures_in_json_and_exits_1(server, tmp_path, capsys):
    dataset = _sharegpt(tmp_path, ["first question", "please FAIL now", "third", "fourth one"])
    out = tmp_path / "result.json"
    before = len(server.bodies())
    code = main(["--base-url", server.url + "/v1", "--backend", "openai",
                 "--dataset-name", "sharegpt",
                 "--dataset-path", str(dataset), "--num-prompts", "4",
                 "--sharegpt-output-len", "3", "--warmup-requests", "0", "--disable-tqdm",
                 "--api-key", API_KEY, "--output-json", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "1 of 4 requests failed: 1x HTTP 500: injected failure" in err
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert (summary["num_requests"], summary["completed"], summary["failed"]) == (4, 3, 1)
    assert summary["total_output_tokens"] == 9
    failed = [r for r in data["requests"] if not r["is_success"]]
    assert len(failed) == 1 and failed[0]["error"] == "HTTP 500: injected failure"
    assert all(len(r["itl_s"]) == 2 for r in data["requests"] if r["is_success"])
    assert data["model"] == MODEL and data["machine"]["node"]
    assert data["config"]["dataset_name"] == "sharegpt" and "api_key" not in data["config"]
    bodies = server.bodies()[before:]
    assert len(bodies) == 4 and all(b["model"] == MODEL for b in bodies)
    assert all("ignore_eos" not in b and b["max_tokens"] == 3 for b in bodies)
    assert sorted(b["prompt"] for b in bodies) == sorted(
        ["first question", "please FAIL now", "third", "fourth one"])


def test_main_random_all_succeed_with_goodput_and_concurrency(server, tmp_path, monkeypatch,
                                                              capsys):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    out = tmp_path / "result.json"
    before = len(server.bodies())
    code = main(["--port", server.url.rsplit(":", 1)[1], "--num-prompts", "3",
                 "--random-input-len", "20", "--random-output-len", "3",
                 "--random-range-ratio", "1", "--max-concurrency", "1", "--disable-tqdm",
                 "--slo-ttft-ms", "60000", "--slo-itl-ms", "1", "--output-json", str(out)])
    assert code == 0
    assert "Goodput" in capsys.readouterr().out
    summary = json.loads(out.read_text())["summary"]
    assert (summary["completed"], summary["failed"]) == (3, 0)
    assert summary["total_input_tokens"] == 3 * (20 + CHAT_OVERHEAD)  # the server's usage
    assert summary["total_output_tokens"] == 9
    assert summary["peak_concurrency"] == 1
    assert summary["tpot_ms"]["mean"] >= 0.8 * ITL_S * 1000
    assert summary["num_good"] == 0 and summary["goodput"] == 0.0  # TPOT > 1 ms
    bodies = server.bodies()[before:]
    assert len(bodies) == 4                                # one warmup + three
    assert all(b["ignore_eos"] is True and len(b["messages"][0]["content"].split()) == 20
               for b in bodies)


@pytest.mark.parametrize("argv", [
    ["--num-prompts", "0"],
    ["--backend", "vllm"],
    ["--dataset-name", "sharegpt"],
    ["--base-url", "http://h:1", "--port", "2"],
    ["--random-range-ratio", "2"],
    ["--request-rate", "0"],
    ["--slo-itl-ms", "-5"],
])
def test_bad_flags_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem bench: error: ") and err.count("\n") == 1


def test_malformed_dataset_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert main(["--dataset-name", "sharegpt", "--dataset-path", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_unreachable_server_exits_1(capsys):
    assert main(["--port", str(free_port()), "--num-prompts", "1", "--disable-tqdm"]) == 1
    err = capsys.readouterr().err
    assert "/v1/models" in err and err.count("\n") == 1


if __name__ == "__main__":
    _serve(sys.argv[1:])
