"""EngineLoop: the engine on its own thread, driven from asyncio — same tokens as the engine
alone, pages back after every way a consumer can leave, failures delivered, no idle spin."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, EngineInputError, LLMEngine
from services.engine.engine_loop import EngineLoop, EngineStepError, EngineStopped
from services.engine.model import LlamaModel
from services.engine.sampling_params import SamplingParams
from services.engine.weights import load_hf_weights
from tests.tiny_models import VOCAB_SIZE, make_tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("loop") / "m"
    make_tiny_model("llama", path)
    return path


def _make_engine(folder, **overrides) -> LLMEngine:
    model = LlamaModel(ModelConfig.from_hf_folder(folder), load_hf_weights(folder))
    return LLMEngine(model, None, EngineConfig(**{"page_size": 4, "num_pages": 64, **overrides}))


def _prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist() for n in lengths]


def _run(folder, body, **overrides):
    """Run `body(loop)` on a started EngineLoop; stop it afterwards."""
    loop = EngineLoop(_make_engine(folder, **overrides))
    loop.start()
    try:
        return asyncio.run(body(loop))
    finally:
        loop.stop()


async def _collect(stream):
    return [out async for out in stream]


async def _assert_all_pages_free(loop: EngineLoop) -> None:
    load = await loop.load()
    assert (load.num_running, load.num_waiting) == (0, 0)
    assert load.num_free_pages == load.num_pages


def test_concurrent_generate_equals_engine_generate(folder):
    prompts = _prompts(3, 9, 17, 30)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (12, 1, 7, 20)]
    expected = _make_engine(folder).generate(prompts, params)

    async def body(loop):
        results = await asyncio.gather(*(
            _collect(loop.generate(f"r{i}", p, sp))
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))))
        await _assert_all_pages_free(loop)
        return results

    for outputs, completion in zip(_run(folder, body), expected, strict=True):
        assert [t for o in outputs for t in o.new_token_ids] == completion.token_ids
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
        assert outputs[-1].finish_reason == "length"


def test_early_close_and_cancellation_abort_and_free_pages(folder):
    engine = _make_engine(folder)
    aborted = []
    real_abort = engine.abort

    def spy_abort(request_id):
        aborted.append(request_id)
        return real_abort(request_id)

    engine.abort = spy_abort  # type: ignore[method-assign]
    loop = EngineLoop(engine)
    loop.start()
    params = SamplingParams(max_tokens=200, **GREEDY)

    async def body():
        async for _ in loop.generate("closed", _prompts(20)[0], params):
            load = await loop.load()
            assert load.num_free_pages < load.num_pages  # the test can fail
            break  # the generator is finalized (aclose) once unreferenced
        task = asyncio.create_task(_collect(loop.generate("cancelled", _prompts(20)[0], params)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the break's abort is posted once the finalizer task runs
            if len(aborted) == 2:
                break
            await asyncio.sleep(0.01)
        await _assert_all_pages_free(loop)

    try:
        asyncio.run(body())
    finally:
        loop.stop()
    assert aborted == ["closed", "cancelled"]
    assert not engine.has_unfinished()


def test_input_errors_raise_from_first_anext_and_change_nothing(folder):
    params = SamplingParams(max_tokens=30, **GREEDY)

    async def body(loop):
        with pytest.raises(EngineInputError, match="empty"):
            await _collect(loop.generate("empty", [], params))
        live = loop.generate("dup", [1, 2, 3], params)
        first = await live.__anext__()
        with pytest.raises(EngineInputError, match="already in use"):
            await _collect(loop.generate("dup", [1, 2], params))
        rest = await _collect(live)  # the live request was not disturbed
        assert len(first.new_token_ids) + sum(len(o.new_token_ids) for o in rest) == 30
        await _assert_all_pages_free(loop)

    _run(folder, body)


def test_abort_delivers_abort_output(folder):
    async def body(loop):
        stream = loop.generate("a", [5, 6, 7], SamplingParams(max_tokens=200, **GREEDY))
        await stream.__anext__()
        assert await loop.abort("a")
        rest = await _collect(stream)
        assert rest[-1].finish_reason == "abort"
        assert not await loop.abort("a")
        await _assert_all_pages_free(loop)

    _run(folder, body)


def test_failing_step_fails_live_requests_and_loop_keeps_serving(folder):
    engine = _make_engine(folder)
    real_step = engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_step()

    engine.step = flaky_step  # type: ignore[method-assign]
    loop = EngineLoop(engine)
    loop.start()

    async def body():
        params = SamplingParams(max_tokens=20, **GREEDY)
        streams = [_collect(loop.generate(f"r{i}", p, params))
                   for i, p in enumerate(_prompts(4, 6))]
        results = await asyncio.gather(*streams, return_exceptions=True)
        assert all(isinstance(r, EngineStepError) and "boom" in str(r) for r in results)
        await _assert_all_pages_free(loop)
        again = await _collect(loop.generate("after", [1, 2, 3], params))
        assert again[-1].finish_reason == "length"

    try:
        asyncio.run(body())
    finally:
        loop.stop()
    assert not loop.is_running


def test_stop_fails_live_requests_and_refuses_new_ones(folder):
    async def body(loop):
        stream = loop.generate("s", [1, 2], SamplingParams(max_tokens=400, **GREEDY))
        await stream.__anext__()
        await asyncio.to_thread(loop.stop)
        with pytest.raises(EngineStopped):
            await _collect(stream)
        with pytest.raises(EngineStopped):
            await loop.load()

    _run(folder, body)


def test_remote_prefill_equals_unified(folder):
    """PD through two loops; the KV copy in the middle is kvd's job."""
    prompt, params = _prompts(13)[0], SamplingParams(max_tokens=10, logprobs=2, **GREEDY)
    expected = _make_engine(folder).generate([prompt], params)[0]
    prefill = EngineLoop(_make_engine(folder))
    decode = EngineLoop(_make_engine(folder, chunked_prefill_size=8))
    prefill.start()
    decode.start()

    async def body():
        first = (await _collect(prefill.generate(
            "room", prompt, SamplingParams(max_tokens=1, logprobs=2, **GREEDY), keep_kv=True)))[-1]
        page_ids = await decode.add_remote_prefill("room", prompt, params)
        assert page_ids is not None and len(page_ids) == len(first.kv_page_ids)
        decode.engine.pool.data[page_ids] = prefill.engine.pool.data[first.kv_page_ids]
        assert await prefill.release_kv("room")
        arrived = await decode.kv_arrived("room", first.new_token_ids[0], first.new_logprobs[0])
        outputs = await _collect(decode.remote_stream("room"))
        assert outputs[0] is arrived
        with pytest.raises(KeyError):
            await _collect(decode.remote_stream("room"))
        await _assert_all_pages_free(prefill)
        await _assert_all_pages_free(decode)
        return outputs

    try:
        outputs = asyncio.run(body())
    finally:
        prefill.stop()
        decode.stop()
    assert [t for o in outputs for t in o.new_token_ids] == expected.token_ids
    assert [lp.token_id for o in outputs for lp in o.new_logprobs] == expected.token_ids


def test_keep_kv_pages_freed_when_consumer_leaves_before_the_last_output(folder):
    async def body(loop):
        stream = loop.generate("held", _prompts(30)[0], SamplingParams(max_tokens=2, **GREEDY),
                               keep_kv=True)
        assert not (await stream.__anext__()).finished
        for _ in range(100):  # finished in the engine, pages held, the last output unread
            load = await loop.load()
            if load.num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert load.num_running == 0 and load.num_free_pages < load.num_pages
        await stream.aclose()
        await _assert_all_pages_free(loop)
        assert not await loop.release_kv("held")

    _run(folder, body)


def test_kv_computed_reaches_the_caller_before_the_finishing_output(folder):
    async def body(loop):
        notices = []
        stream = loop.generate("ahead", _prompts(30)[0], SamplingParams(max_tokens=1, **GREEDY),
                               keep_kv=True, on_kv_computed=notices.append)
        async for out in stream:
            assert out.finished and [n.page_ids for n in notices] == [out.kv_page_ids]
        assert notices[0].request_id == "ahead"
        assert await loop.release_kv("ahead")
        await _assert_all_pages_free(loop)

    _run(folder, body)


def test_abort_while_awaiting_kv_frees_reserved_pages(folder):
    async def body(loop):
        assert await loop.add_remote_prefill("r", _prompts(30)[0], SamplingParams()) is not None
        load = await loop.load()
        assert load.num_free_pages < load.num_pages
        assert await loop.abort("r")
        await _assert_all_pages_free(loop)

    _run(folder, body)


def test_idle_loop_does_not_spin(folder):
    async def body(loop):
        await _collect(loop.generate("warm", [1, 2], SamplingParams(max_tokens=2, **GREEDY)))
        start = time.process_time()
        await asyncio.sleep(0.5)
        return time.process_time() - start

    assert _run(folder, body) < 0.1
