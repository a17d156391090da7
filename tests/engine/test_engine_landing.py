"""Ready flags at the engine: kvd answers early (first token known, KV still landing) and the
engine decodes the request only once its flag says LANDED; a FAILED flag ends it; pages of a
request that ended while its KV was landing stay held until the flag is final.

kvd is stood in for by hand: a plain tensor copy into the reserved pages, and flags set with
`ReadyFlags.set_landed` / `set_failed` on a bytearray.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import torch

from services.common.ready_flags import ReadyFlags, flags_bytes
from services.engine.config import ModelConfig
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.engine_loop import EngineLoop, KvLandingFailed
from services.engine.model import LlamaModel
from services.engine.output import Completion, RequestOutput
from services.engine.sampling_params import SamplingParams
from services.engine.weights import load_hf_weights
from tests.tiny_models import VOCAB_SIZE

GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
TICKET = 7


def _make_engine(folder, device: str = "cpu", **overrides) -> LLMEngine:
    model = LlamaModel(ModelConfig.from_hf_folder(folder), load_hf_weights(folder), device=device)
    return LLMEngine(model, None, EngineConfig(**{"page_size": 4, "num_pages": 64,
                                                  "device": device, **overrides}))


def _make_flags(num_pages: int = 64) -> ReadyFlags:
    return ReadyFlags(memoryview(bytearray(flags_bytes(num_pages))), num_pages)


def _prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(9)
    return [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist() for n in lengths]


def _prefill(folder, prompt: list[int], **overrides) -> tuple[RequestOutput, torch.Tensor]:
    """The prefill side: the first output and the prompt's KV pages (what kvd would move)."""
    engine = _make_engine(folder, **overrides)
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, **GREEDY), keep_kv=True)
    (first,) = engine.step()
    assert first.kv_page_ids is not None
    return first, engine.pool.data[first.kv_page_ids].clone()


def test_gated_request_decodes_only_after_landed_and_equals_unified(model):
    prompt, other = _prompts(13, 6)
    params = SamplingParams(max_tokens=8, **GREEDY)
    expected = [c.token_ids for c in _make_engine(model).generate([prompt, other], params)]
    first, kv = _prefill(model, prompt)
    engine, flags = _make_engine(model), _make_flags()
    page_ids = engine.add_remote_prefill("gated", prompt, params)
    assert page_ids is not None
    results = {"gated": Completion("gated", prompt), "other": Completion("other", other)}
    results["gated"].add(engine.kv_arrived("gated", first.new_token_ids[0],
                                           landing=flags.landing(page_ids[0], TICKET)))
    engine.add_request("other", other, params)
    untouched = engine.pool.data[page_ids].clone()

    def step_only_other() -> None:
        (out,) = engine.step()
        assert out.request_id == "other"
        results["other"].add(out)

    for _ in range(3):  # "other" prefills and decodes; "gated" must not run
        step_only_other()
    assert torch.equal(engine.pool.data[page_ids], untouched)
    assert engine.has_unfinished() and engine.awaits_landing()
    engine.pool.data[page_ids] = kv  # kvd's write lands after the early answer...
    step_only_other()
    flags.set_landed(page_ids[0], TICKET)  # ...and only then is the flag set
    while engine.has_work():
        for o in engine.step():
            results[o.request_id].add(o)
    assert results["gated"].token_ids == expected[0]
    assert results["other"].token_ids == expected[1]
    assert not engine.awaits_landing() and engine.kv.num_held_pages == 0


@pytest.mark.parametrize("found_by", ["poll_landings", "step"])
def test_failed_landing_removes_the_request_and_frees_its_pages(model, found_by):
    engine, flags = _make_engine(model), _make_flags()
    num_free = engine.kv.num_free_pages
    params = SamplingParams(max_tokens=8, **GREEDY)
    page_ids = engine.add_remote_prefill("r", _prompts(13)[0], params)
    assert page_ids is not None
    first = engine.kv_arrived("r", 5, landing=flags.landing(page_ids[0], TICKET))
    assert not first.finished and engine.poll_landings() == []
    flags.set_failed(page_ids[0], TICKET)
    if found_by == "step":
        assert engine.step() == []
        assert engine.take_failed_landings() == ["r"]
    else:
        assert engine.poll_landings() == ["r"]
    assert engine.poll_landings() == [] and engine.take_failed_landings() == []  # reported once
    assert engine.kv.num_free_pages == num_free
    assert not engine.has_unfinished() and not engine.awaits_landing()
    assert engine.abort("r") is None


@pytest.mark.parametrize("final", ["landed", "failed"])
def test_abort_while_landing_holds_pages_until_the_flag_is_final(model, final):
    engine, flags = _make_engine(model, num_pages=4), _make_flags(4)
    prompt, params = _prompts(13)[0], SamplingParams(max_tokens=8, **GREEDY)
    page_ids = engine.add_remote_prefill("r", prompt, params)
    assert page_ids is not None and len(page_ids) == 4
    engine.kv_arrived("r", 5, landing=flags.landing(page_ids[0], TICKET))
    out = engine.abort("r")
    assert out is not None and out.finish_reason == "abort"
    assert not engine.has_unfinished() and engine.num_unfinished == 0
    for _ in range(3):  # kvd may still write them: no one else may get them
        assert engine.step() == [] and engine.poll_landings() == []
        assert engine.kv.num_held_pages == 4 and engine.awaits_landing()
        assert engine.add_remote_prefill("next", prompt, params) is None
    if final == "landed":
        flags.set_landed(page_ids[0], TICKET)
    else:
        flags.set_failed(page_ids[0], TICKET)
    assert engine.poll_landings() == []  # aborted: not reported as failed
    assert engine.kv.num_held_pages == 0 and not engine.awaits_landing()
    assert engine.add_remote_prefill("next", prompt, params) is not None


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=1, **GREEDY),
                                    SamplingParams(max_tokens=8, stop_token_ids=(5,),
                                                   temperature=0.0)])
def test_finished_first_output_holds_pages_until_the_flag_is_final(model, params):
    engine, flags = _make_engine(model, num_pages=4), _make_flags(4)
    prompt = _prompts(13)[0]
    page_ids = engine.add_remote_prefill("r", prompt, params)
    assert page_ids is not None
    first = engine.kv_arrived("r", 5, landing=flags.landing(page_ids[0], TICKET))
    assert first.finished and first.new_token_ids == [5]
    assert not engine.has_unfinished() and engine.awaits_landing()
    assert engine.step() == [] and engine.kv.num_held_pages == 4
    assert engine.add_remote_prefill("next", prompt, params) is None
    flags.set_landed(page_ids[0], TICKET)
    assert engine.step() == []
    assert engine.kv.num_held_pages == 0 and not engine.awaits_landing()


@pytest.mark.gpu
def test_landing_and_parking_around_overlapped_decode_steps(model):
    """CUDA graphs with overlap: a request gated while another decodes overlapped joins once
    landed (the step drains first) with the CPU's tokens; one aborted while a step is in flight
    parks its pages until its flag fails."""
    prompt, other, spare = _prompts(13, 6, 21)
    params = SamplingParams(max_tokens=12, **GREEDY)
    expected = [c.token_ids
                for c in _make_engine(model, page_size=16).generate([prompt, other], params)]
    first, kv = _prefill(model, prompt, page_size=16)
    engine = _make_engine(model, "cuda", page_size=16, attention_backend="triton")
    flags = _make_flags()
    assert engine._overlap is not None
    gated_ids = engine.add_remote_prefill("gated", prompt, params)
    parked_ids = engine.add_remote_prefill("parked", spare, params)
    assert gated_ids is not None and parked_ids is not None
    results = {"gated": Completion("gated", prompt), "other": Completion("other", other)}
    results["gated"].add(engine.kv_arrived("gated", first.new_token_ids[0],
                                           landing=flags.landing(gated_ids[0], TICKET)))
    engine.kv_arrived("parked", 5, landing=flags.landing(parked_ids[0], TICKET))
    engine.add_request("other", other, params)
    for _ in range(4):
        for out in engine.step():
            assert out.request_id == "other"
            results["other"].add(out)
    assert engine._overlap.busy  # "other" decodes overlapped while both rooms wait
    num_held = engine.kv.num_held_pages
    out = engine.abort("parked")
    assert out is not None and out.finish_reason == "abort"
    assert engine.kv.num_held_pages == num_held and engine.awaits_landing()
    engine.pool.data[gated_ids] = kv.to("cuda")
    flags.set_landed(gated_ids[0], TICKET)
    flags.set_failed(parked_ids[0], TICKET)
    while engine.has_work():
        for out in engine.step():
            results[out.request_id].add(out)
    assert [results[rid].token_ids for rid in ("gated", "other")] == expected
    assert engine.kv.num_held_pages == 0 and not engine.awaits_landing()


# --- EngineLoop ----------------------------------------------------------------------------


def _run(folder, body):
    loop = EngineLoop(_make_engine(folder))
    loop.start()
    try:
        return asyncio.run(body(loop))
    finally:
        loop.stop()


async def _collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


async def _assert_all_pages_free(loop: EngineLoop) -> None:
    load = await loop.load()
    assert (load.num_running, load.num_waiting, load.num_free_pages) == (0, 0, load.num_pages)


def test_loop_streams_the_rest_once_another_thread_sets_the_flag(model):
    prompt, params = _prompts(13)[0], SamplingParams(max_tokens=10, **GREEDY)
    expected = _make_engine(model).generate([prompt], params)[0].token_ids
    first, kv = _prefill(model, prompt)
    flags = _make_flags()

    async def body(loop):
        page_ids = await loop.add_remote_prefill("room", prompt, params)
        landing = flags.landing(page_ids[0], TICKET)

        def land() -> None:  # kvd's side: the bytes, then the flag
            loop.engine.pool.data[page_ids] = kv
            flags.set_landed(page_ids[0], TICKET)

        kvd = threading.Timer(0.05, land)
        kvd.start()
        arrived = await loop.kv_arrived("room", first.new_token_ids[0], landing=landing)
        outputs = await asyncio.wait_for(_collect(loop.remote_stream("room")), 10)
        kvd.join()
        assert outputs[0] is arrived
        await _assert_all_pages_free(loop)
        return outputs

    outputs = _run(model, body)
    assert [t for o in outputs for t in o.new_token_ids] == expected


def test_loop_delivers_a_failed_landing_to_the_stream(model):
    flags = _make_flags()

    async def body(loop):
        params = SamplingParams(max_tokens=10, **GREEDY)
        page_ids = await loop.add_remote_prefill("room", _prompts(13)[0], params)
        kvd = threading.Timer(0.05, flags.set_failed, (page_ids[0], TICKET))
        kvd.start()
        arrived = await loop.kv_arrived("room", 5, landing=flags.landing(page_ids[0], TICKET))
        stream = loop.remote_stream("room")
        assert await stream.__anext__() is arrived
        with pytest.raises(KvLandingFailed, match="'room'.*after the first token"):
            await asyncio.wait_for(stream.__anext__(), 5)
        kvd.join()
        await _assert_all_pages_free(loop)

    _run(model, body)


def test_loop_polls_while_awaiting_a_landing_and_rests_afterwards(model):
    prompt, params = _prompts(13)[0], SamplingParams(max_tokens=3, **GREEDY)
    first, kv = _prefill(model, prompt)
    flags = _make_flags()

    async def body(loop):
        page_ids = await loop.add_remote_prefill("room", prompt, params)
        loop.engine.pool.data[page_ids] = kv
        await loop.kv_arrived("room", first.new_token_ids[0],
                              landing=flags.landing(page_ids[0], TICKET))
        stream = loop.remote_stream("room")
        await stream.__anext__()
        await asyncio.sleep(0.1)  # no command comes: only polling can notice the flag
        start = time.perf_counter()
        flags.set_landed(page_ids[0], TICKET)
        await asyncio.wait_for(stream.__anext__(), 5)
        noticed_s = time.perf_counter() - start
        assert (await asyncio.wait_for(_collect(stream), 10))[-1].finished
        await _assert_all_pages_free(loop)
        cpu_start = time.process_time()
        await asyncio.sleep(0.5)
        return noticed_s, time.process_time() - cpu_start

    noticed_s, idle_cpu_s = _run(model, body)
    assert noticed_s < 0.05  # one tiny decode step and a thread hop; IDLE_WAIT_S is 1 s
    assert idle_cpu_s < 0.1  # nothing awaits a landing any more: no polling
