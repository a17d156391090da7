"""The PD gateway when prefill workers die: requests fail fast or are retried, never hang, and
no page stays held. Each test gets its own deployment (it kills part of it)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.gateway.stack import Stack, metric
from tests.pd.harness import launch_worker

# prompts long enough, and chunks small enough, that requests queue at the prefill workers
PREFILL = ["--chunked-prefill-size", "16"]


@pytest.fixture
def stack(model, tmp_path):
    s = Stack(tmp_path, str(model))
    try:
        yield s
    finally:
        s.stop_all()


def _prompts(count: int, length: int) -> list[str]:
    return [(f"request {i}: " + "lorem ipsum dolor sit amet " * 40)[:length]
            for i in range(count)]


async def _complete_all(url: str, model: str, prompts: list[str], max_tokens: int
                        ) -> list[str | Exception]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    try:
        async def one(prompt: str) -> str:
            r = await client.completions.create(model=model, prompt=prompt, temperature=0,
                                                max_tokens=max_tokens,
                                                extra_body={"ignore_eos": True})
            return r.choices[0].text
        return await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
    finally:
        await client.close()


def test_only_prefill_killed_fails_fast_with_503(stack):
    p_node, d_node = stack.node("node-p"), stack.node("node-d")
    prefill = stack.worker("prefill", p_node)
    decode = stack.worker("decode", d_node)
    url = stack.gateway(["--pd-disaggregation", "--prefill", prefill, "--decode", decode])
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    assert asyncio.run(_complete_all(url, model, ["warm up"], 4))[0]
    stack.kill_worker(prefill)
    for _ in range(3):
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hello",
                                                      "max_tokens": 4}, timeout=30)
        took = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_healthy_worker"
        assert took < 3.0, f"503 took {took:.1f}s"
    assert httpx.get(f"{url}/health").status_code == 503
    stack.assert_baseline(timeout=15)  # the decode side freed the cancelled rooms


def test_two_prefills_one_killed_mid_load_loses_nothing(stack, model):
    p1, p2, d_node = stack.node("node-p1"), stack.node("node-p2"), stack.node("node-d")
    prefills = [stack.worker("prefill", p1, PREFILL), stack.worker("prefill", p2, PREFILL)]
    decode = stack.worker("decode", d_node, ["--max-running-requests", "64"])
    url = stack.gateway(["--pd-disaggregation", "--prefill", prefills[0], "--prefill",
                         prefills[1], "--decode", decode, "--prefill-policy", "round_robin"])
    name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    prompts = _prompts(32, 400)
    expected = asyncio.run(_complete_all(url, name, prompts, 6))
    assert all(isinstance(t, str) for t in expected), expected

    async def load_and_kill() -> list[str | Exception]:
        work = asyncio.ensure_future(_complete_all(url, name, prompts, 6))
        # kill once the first prefill has work queued
        while metric(url, "tandem_gateway_worker_in_flight_requests", role="prefill",
                      url=prefills[0]) < 3:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(stack.kill_worker, prefills[0])
        return await work

    got = asyncio.run(load_and_kill())
    errors = [g for g in got if not isinstance(g, str)]
    assert not errors, errors
    assert got == expected
    assert metric(url, "tandem_gateway_retries_total", role="prefill") >= 1
    assert metric(url, "tandem_gateway_worker_healthy", url=prefills[0]) == 0
    stack.assert_baseline(timeout=15)

    # the worker restarted on its port comes back into rotation
    port = int(prefills[0].rsplit(":", 1)[1])
    proc, _ = launch_worker(stack.tmp, "prefill", model, p1, stack.backend, port=port,
                            extra=PREFILL)
    stack.workers.append((proc, port, "prefill", p1))
    deadline = time.monotonic() + 20
    while metric(url, "tandem_gateway_worker_healthy", url=prefills[0]) != 1:
        assert time.monotonic() < deadline, "restarted prefill worker not back in rotation"
        time.sleep(0.2)
    assert asyncio.run(_complete_all(url, name, prompts[:4], 6)) == expected[:4]
    stack.assert_baseline(timeout=15)
