"""The gateway through the official `openai` SDK, in PD mode and unified mode, on real processes.

One module-wide deployment: a unified worker behind one gateway; a prefill and a decode worker,
each on its own "node" (kvd) with Mooncake between them, behind a PD gateway. Both gateways
require an API key (one by flag, one by environment variable). Greedy outputs must be equal
across the two modes; after every test no page is pinned or held anywhere.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.gateway.stack import API_KEY, Stack
from tests.tiny_models import make_tiny_model

PROMPTS = ["hello there", "the quick brown fox jumps over", "a", "PD == unified? " * 6]
CHATS = [[{"role": "user", "content": p}] for p in PROMPTS[:3]] + [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"},
     {"role": "assistant", "content": "because"}, {"role": "user", "content": "ok"}]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    model = tmp / "model"
    make_tiny_model("llama", model)
    s = Stack(tmp, str(model))
    try:
        unified = s.worker("null", None)
        p_node, d_node = s.node("node-p"), s.node("node-d")
        prefill = s.worker("prefill", p_node)
        decode = s.worker("decode", d_node)
        s.urls = {
            "unified": s.gateway(["--worker", unified, "--api-key", API_KEY]),
            "pd": s.gateway(["--pd-disaggregation", "--prefill", prefill, "--decode", decode],
                            env={"TANDEM_API_KEY": API_KEY}),
        }
        s.model_name = httpx.get(f"{s.urls['pd']}/v1/models",
                                 headers={"Authorization": f"Bearer {API_KEY}"}
                                 ).json()["data"][0]["id"]
        yield s
    finally:
        s.stop_all()


@pytest.fixture(autouse=True)
def no_leaks(stack):
    yield
    stack.assert_baseline()


def client(stack, mode: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.urls[mode]}/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)


def aclient(stack, mode: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.urls[mode]}/v1", api_key=API_KEY,
                              max_retries=0, timeout=60)


MODES = ["pd", "unified"]


def test_models_lists_the_workers_model(stack):
    for mode in MODES:
        models = client(stack, mode).models.list().data
        assert [m.id for m in models] == [stack.model_name]
        assert client(stack, mode).models.retrieve(stack.model_name).id == stack.model_name


def test_greedy_chat_and_completions_equal_across_modes(stack):
    results = {}
    for mode in MODES:
        c = client(stack, mode)
        chats = [c.chat.completions.create(model=stack.model_name, messages=m, temperature=0,
                                           max_tokens=12) for m in CHATS]
        texts = [c.completions.create(model=stack.model_name, prompt=p, temperature=0,
                                      max_tokens=10) for p in PROMPTS]
        results[mode] = ([(r.choices[0].message.content, r.choices[0].finish_reason,
                           r.usage.prompt_tokens, r.usage.completion_tokens) for r in chats],
                         [(r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens)
                          for r in texts])
    assert results["pd"] == results["unified"]
    chats, texts = results["pd"]
    for content, finish, prompt_tokens, completion_tokens in chats:
        assert isinstance(content, str)
        assert finish in ("stop", "length") and prompt_tokens > 0
        assert 1 <= completion_tokens <= 12 and (finish == "stop" or completion_tokens == 12)
    # byte-level tokenizer: one token per byte of the prompt
    assert [t[1] for t in texts] == [len(p.encode()) for p in PROMPTS]
    assert all(1 <= t[2] <= 10 for t in texts)


@pytest.mark.parametrize("mode", MODES)
def test_streaming_equals_whole_answer_with_usage(stack, mode):
    c = client(stack, mode)
    whole = c.chat.completions.create(model=stack.model_name, messages=CHATS[1],
                                      temperature=0, max_tokens=16)
    chunks = list(c.chat.completions.create(
        model=stack.model_name, messages=CHATS[1], temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    done = list(c.completions.create(model=stack.model_name, prompt=PROMPTS[1], temperature=0,
                                     max_tokens=9, stream=True))
    assert "".join(ch.choices[0].text for ch in done) == c.completions.create(
        model=stack.model_name, prompt=PROMPTS[1], temperature=0, max_tokens=9).choices[0].text


def test_async_concurrent_requests_equal_across_modes(stack):
    async def run(mode: str, stream: bool) -> list[str]:
        c = aclient(stack, mode)

        async def one(i: int) -> str:
            prompt = f"{i} " + PROMPTS[i % len(PROMPTS)]
            if not stream:
                r = await c.completions.create(model=stack.model_name, prompt=prompt,
                                               temperature=0, max_tokens=8 + i % 4)
                return r.choices[0].text
            parts = []
            async for ch in await c.completions.create(
                    model=stack.model_name, prompt=prompt, temperature=0, max_tokens=8 + i % 4,
                    stream=True):
                parts.append(ch.choices[0].text)
            return "".join(parts)

        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await c.close()

    unified = asyncio.run(run("unified", False))
    assert asyncio.run(run("pd", False)) == unified
    assert asyncio.run(run("pd", True)) == unified


@pytest.mark.parametrize("mode", MODES)
def test_stop_strings_end_before_the_stop(stack, mode):
    c = client(stack, mode)
    full = c.completions.create(model=stack.model_name, prompt=PROMPTS[0], temperature=0,
                                max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) >= 6
    stop = full[3:5]
    cut = c.completions.create(model=stack.model_name, prompt=PROMPTS[0], temperature=0,
                               max_tokens=24, stop=[stop, "\x00never"],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[:full.index(stop)] and stop not in cut.text


@pytest.mark.parametrize("mode", MODES)
def test_n_and_seed(stack, mode):
    c = client(stack, mode)

    def sample(seed: int, n: int = 3):
        return c.completions.create(model=stack.model_name, prompt=PROMPTS[1], temperature=1.0,
                                    max_tokens=12, n=n, seed=seed,
                                    extra_body={"ignore_eos": True})

    a, b, other = sample(5), sample(5), sample(6)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    texts = [ch.text for ch in a.choices]
    assert texts == [ch.text for ch in b.choices]           # same seed, same samples
    assert len(set(texts)) > 1                               # choices differ from each other
    assert texts != [ch.text for ch in other.choices]       # another seed, other samples
    assert a.usage.completion_tokens == 36                   # every choice counted
    assert a.usage.prompt_tokens == len(PROMPTS[1].encode())  # the prompt once
    # choice 0 of seed s is what n=1 gives with seed s
    assert sample(5, n=1).choices[0].text == texts[0]


@pytest.mark.parametrize("mode", MODES)
def test_logprobs(stack, mode):
    c = client(stack, mode)
    r = c.chat.completions.create(model=stack.model_name, messages=CHATS[0], temperature=0,
                                  max_tokens=8, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.token == item.top_logprobs[0].token      # greedy picks the best
        assert item.logprob == pytest.approx(tops[0]) and item.logprob <= 0
    joined = b"".join(bytes(item.bytes) for item in content).decode(errors="replace")
    assert joined.startswith(r.choices[0].message.content)  # EOS text may follow
    t = c.completions.create(model=stack.model_name, prompt=PROMPTS[0], temperature=0,
                             max_tokens=6, logprobs=2, extra_body={"ignore_eos": True})
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(6)]
    no = c.completions.create(model=stack.model_name, prompt=PROMPTS[0], max_tokens=2)
    assert no.choices[0].logprobs is None


def _raw(stack, mode: str, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{stack.urls[mode]}{path}", content=content, headers=headers,
                      timeout=30)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error
    return error


@pytest.mark.parametrize("mode", MODES)
def test_errors_have_openai_shape_and_status(stack, mode):
    name = stack.model_name
    chat = "/v1/chat/completions"
    _error(_raw(stack, mode, chat, b"{not json"), 400)
    _error(_raw(stack, mode, chat, b"[1, 2]"), 400)
    assert _error(_raw(stack, mode, chat, {"model": name}), 400)["param"] == "messages"
    assert _error(_raw(stack, mode, chat, {"model": name, "messages": [
        {"role": "user", "content": "x"}], "temperature": 3}), 400)["param"] == "temperature"
    assert _error(_raw(stack, mode, "/v1/completions", {
        "model": name, "prompt": "x", "n": 0}), 400)["param"] == "n"
    _error(_raw(stack, mode, chat, {"model": name, "messages": [
        {"role": "user", "content": "x"}], "tools": [{"type": "function"}]}), 400)
    too_long = _error(_raw(stack, mode, "/v1/completions",
                           {"model": name, "prompt": "x" * 600, "max_tokens": 4}), 400)
    assert "600" in too_long["message"] and "512" in too_long["message"]
    streamed = _raw(stack, mode, "/v1/completions",
                    {"model": name, "prompt": "x" * 600, "max_tokens": 4, "stream": True})
    assert "600" in _error(streamed, 400)["message"]  # a stream's early failure keeps its status
    assert _error(_raw(stack, mode, chat, {"model": "no-such-model", "messages": [
        {"role": "user", "content": "x"}]}), 404)["code"] == "model_not_found"
    for key in (None, "sk-wrong"):
        assert _error(_raw(stack, mode, chat, {"model": name, "messages": [
            {"role": "user", "content": "x"}]}, key=key), 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.urls[mode]}/v1", api_key="sk-wrong",
                      max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client(stack, mode).chat.completions.create(model="nope", messages=CHATS[0])
    with pytest.raises(openai.BadRequestError, match="600"):
        client(stack, mode).completions.create(model=name, prompt="y" * 600, max_tokens=2)
    assert httpx.get(f"{stack.urls[mode]}/health").status_code == 200  # no key needed


@pytest.mark.parametrize("mode", MODES)
def test_client_disconnect_cancels_both_legs(stack, mode):
    """Close a stream after two chunks; the workers abort and free everything (the autouse
    fixture checks kvds and workers return to baseline)."""
    body = {"model": stack.model_name, "prompt": PROMPTS[3], "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.urls[mode]}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got == 2:
                break
    stack.assert_baseline(timeout=15)
    metrics = httpx.get(f"{stack.urls[mode]}/metrics").text
    assert "tandem_gateway_cancellations_total" in metrics
    value = [line for line in metrics.splitlines()
             if line.startswith("tandem_gateway_cancellations_total")][0]
    assert float(value.split()[-1]) >= 1


def test_unready_gateway_answers_503(stack, tmp_path):
    from tests.procs import free_port
    nothing = f"http://127.0.0.1:{free_port()}"
    url = stack.gateway(["--worker", nothing], wait=False)
    r = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=10)
    assert _error(r, 503)["code"] == "no_healthy_worker"
    assert httpx.get(f"{url}/health").status_code == 503
