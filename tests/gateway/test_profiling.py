"""Profiling in PD mode: prefill and decode workers are profiled separately — the decode worker
through the gateway's /start_profile and /stop_profile, the prefill worker with
`tandem profile --worker` — and each writes a trace file holding its forward passes."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.gateway.stack import Stack
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profiling")
    model = tmp / "model"
    make_tiny_model("llama", model)
    s = Stack(tmp, str(model))
    try:
        node = s.node("node")
        s.prefill = s.worker("prefill", node)
        s.decode = s.worker("decode", node)
        s.url = s.gateway(["--pd-disaggregation", "--prefill", s.prefill, "--decode", s.decode])
        yield s
    finally:
        s.stop_all()


def _complete(url: str, n: int) -> None:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    for i in range(n):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": model, "prompt": f"profile me {i}", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text


def _ops(trace_path: str) -> set[str]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    return {e.get("name", "") for e in events}


def test_decode_profiled_through_the_gateway(stack, tmp_path):
    out = tmp_path / "traces"
    r = httpx.post(f"{stack.url}/start_profile", json={"role": "decode", "output_dir": str(out)})
    assert r.status_code == 200, r.text
    assert [w["role"] for w in r.json()["workers"]] == ["decode"]
    again = httpx.post(f"{stack.url}/start_profile", json={"role": "decode"})
    assert again.status_code == 400 and "already" in again.json()["error"]["message"]
    _complete(stack.url, 3)
    r = httpx.post(f"{stack.url}/stop_profile", json={"role": "decode"}, timeout=120)
    assert r.status_code == 200, r.text
    (entry,) = r.json()["workers"]
    assert entry["trace_path"].startswith(str(out / "decode-"))
    ops = _ops(entry["trace_path"])
    assert any(op.startswith("aten::") for op in ops), sorted(ops)[:20]  # the forward passes
    stopped = httpx.post(f"{stack.url}/stop_profile", json={"role": "decode"})
    assert stopped.status_code == 400 and "not being profiled" in stopped.json()["error"]["message"]
    bad = httpx.post(f"{stack.url}/start_profile", json={"role": "nobody"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "role"


def test_prefill_profiled_with_the_cli(stack, tmp_path):
    target = stack.prefill.removeprefix("http://")
    cli = [sys.executable, "-m", "services.cli", "profile"]
    started = subprocess.run([*cli, "start", "--worker", target, "--output-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    _complete(stack.url, 2)
    stopped = subprocess.run([*cli, "stop", "--worker", target], capture_output=True, text=True,
                             timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    (trace,) = list(tmp_path.glob("prefill-*.trace.json"))
    assert str(trace) in stopped.stdout
    assert any(op.startswith("aten::") for op in _ops(str(trace)))
    again = subprocess.run([*cli, "stop", "--worker", target], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr
