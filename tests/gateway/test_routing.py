"""Routing policies on real workers, seen through the workers' prefix caches, and the gateway's
/metrics counts after a known workload.

Two unified workers; each request's `usage.prompt_tokens_details.cached_tokens` says whether
it landed on a worker that had seen its prefix. cache_aware must send a shared prefix back to
the worker that has it; round_robin must alternate.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway.stack import Stack, scrape
from tests.tiny_models import make_tiny_model

PREFIX = "You are a helpful assistant who answers in one short sentence. " * 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    model = tmp / "model"
    make_tiny_model("llama", model)
    s = Stack(tmp, str(model))
    try:
        s.unified = [s.worker("null", None), s.worker("null", None)]
        yield s
    finally:
        s.stop_all()


def _cached(url: str, prompts: list[str]) -> list[int]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    out = []
    for prompt in prompts:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
        out.append(r.usage.prompt_tokens_details.cached_tokens)
    return out


def test_cache_aware_returns_a_prefix_to_its_worker(stack):
    url = stack.gateway(["--worker", *stack.unified, "--policy", "cache_aware"])
    cached = _cached(url, [PREFIX + f"question {i}?" for i in range(6)])
    assert cached[0] == 0
    assert all(c >= len(PREFIX) // 2 for c in cached[1:]), cached  # page-aligned share


def test_round_robin_alternates(stack):
    url = stack.gateway(["--worker", *stack.unified, "--policy", "round_robin"])
    other = "A different long prefix that neither worker has cached yet, at all. " * 3
    cached = _cached(url, [other + f"q{i}" for i in range(4)])
    # first visit to each worker misses, the second visit to each hits
    assert cached[0] == 0 and cached[1] == 0, cached
    assert cached[2] > 0 and cached[3] > 0, cached


def test_metrics_count_a_known_workload(stack):
    url = stack.gateway(["--worker", *stack.unified])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    tokens = prompt_tokens = 0
    for i in range(5):
        r = client.completions.create(model=model, prompt=f"count {i}", max_tokens=4,
                                      temperature=0, extra_body={"ignore_eos": True})
        tokens += r.usage.completion_tokens
        prompt_tokens += r.usage.prompt_tokens
    two = client.completions.create(model=model, prompt=["one", "prompt two"], max_tokens=1,
                                    n=2, temperature=0, extra_body={"ignore_eos": True})
    assert two.usage.prompt_tokens == len("one") + len("prompt two")  # each prompt once
    tokens += two.usage.completion_tokens
    prompt_tokens += two.usage.prompt_tokens
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "s"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    prompt_tokens += chunks[-1].usage.prompt_tokens
    httpx.post(f"{url}/v1/completions", content=b"{bad", timeout=10)
    samples = scrape(url)
    requests = samples["tandem_gateway_requests_total"]
    assert requests[(("endpoint", "/v1/completions"), ("status", "200"))] == 6
    assert requests[(("endpoint", "/v1/completions"), ("status", "400"))] == 1
    assert requests[(("endpoint", "/v1/chat/completions"), ("status", "200"))] == 1
    assert samples["tandem_gateway_completion_tokens_total"][()] == tokens + 3
    assert samples["tandem_gateway_prompt_tokens_total"][()] == prompt_tokens
    assert samples["tandem_gateway_time_to_first_token_seconds_count"][()] == 7
    assert samples["tandem_gateway_inter_token_latency_seconds_count"][()] == 5 * 3 + 2
    healthy = samples["tandem_gateway_worker_healthy"]
    assert sorted(healthy.values()) == [1.0, 1.0] and len(healthy) == 2
