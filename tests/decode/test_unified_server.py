"""`tandem serve --disaggregation-mode null`: a real worker process, talked to over gRPC as a
client would — tokens equal the engine's in-process, errors have the right status, pages come
back after cancellation, SIGTERM drains."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_errors import ExceptionInterceptor
from services.common.proto.tandem.v1 import worker_pb2 as pb
from services.common.proto.tandem.v1 import worker_pb2_grpc
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.loader import load_model
from services.engine.sampling_params import SamplingParams
from tests.procs import free_port, stop, wait_healthy
from tests.tiny_models import VOCAB_SIZE, make_tiny_model

TANDEM = shutil.which("tandem", path=str(Path(sys.executable).parent)) or "tandem"
# Servers of this module, started together so their start-ups overlap; flags after the model.
SERVERS = {"main": [], "short": ["--max-model-len", "32"], "drain": [], "embedded": None}


@dataclass
class Server:
    proc: subprocess.Popen
    target: str
    log: Path

    def stub(self) -> worker_pb2_grpc.GenerateServiceStub:
        return worker_pb2_grpc.GenerateServiceStub(grpc.insecure_channel(self.target))

    def ready(self) -> Server:
        wait_healthy(self.target, self.proc, timeout=90)
        return self


def _start(folder: Path, log: Path, flags: list[str] | None) -> Server:
    port = free_port()
    model = [] if flags is None else ["--model-path", str(folder), *flags]
    proc = subprocess.Popen([TANDEM, "serve", "--port", str(port), "--disaggregation-mode",
                             "null", *model], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    return Server(proc, f"127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unified") / "tiny-llama"
    make_tiny_model("llama", path)
    return path


@pytest.fixture(scope="module")
def servers(folder):
    started = {name: _start(folder, folder.parent / f"{name}.log", flags)
               for name, flags in SERVERS.items()}
    yield started
    for server in started.values():
        stop(server.proc)


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"].ready()


@pytest.fixture(scope="module")
def stub(server) -> worker_pb2_grpc.GenerateServiceStub:
    return server.stub()


@pytest.fixture(scope="module")
def reference(folder) -> LLMEngine:
    loaded = load_model(str(folder))
    return LLMEngine(loaded.model, loaded.tokenizer, EngineConfig())


def _greedy(max_tokens: int, **extra) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


def _engine_params(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)


def _status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        list(call())
    return info.value.code(), info.value.details()


def _wait_all_pages_free(stub, timeout: float = 5.0) -> pb.LoadResponse:
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(pb.LoadRequest(), timeout=5)
        if (load.num_free_pages == load.num_pages and load.num_running == 0) or \
                time.monotonic() > deadline:
            return load
        time.sleep(0.02)


def test_health_and_model_info(server, stub):
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert (info.model_name, info.max_model_len, info.vocab_size) == ("tiny-llama", 512,
                                                                      VOCAB_SIZE)
    assert (info.disaggregation_mode, info.kvd_peer_address) == ("null", "")
    assert "serving tiny-llama (null) on " + server.target in server.log.read_text()


def test_greedy_generate_equals_engine(stub, reference):
    tok = reference.tokenizer
    messages = [pb.ChatMessage(role="user", content="Name a colour.")]
    text = "The capital of France is"
    cases = [
        (pb.GenerateRequest(text=text), tok.encode(text)),
        (pb.GenerateRequest(chat=pb.ChatMessages(messages=messages, add_generation_prompt=True)),
         tok.encode_chat([{"role": "user", "content": "Name a colour."}])),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[7, 70, 101, 200, 33])),
         [7, 70, 101, 200, 33]),
    ]
    for i, (request, prompt) in enumerate(cases):
        request.request_id = f"greedy-{i}"
        request.sampling.CopyFrom(_greedy(24))
        responses = list(stub.Generate(request, timeout=30))
        expected = reference.generate([prompt], _engine_params(24))[0]
        assert [t for r in responses for t in r.token_ids] == expected.token_ids
        assert "".join(r.text for r in responses) == expected.text
        assert [r.usage.completion_tokens for r in responses] == list(range(1, 25))
        assert {r.usage.prompt_tokens for r in responses} == {len(prompt)}
        assert [r.finish_reason for r in responses][-2:] == [pb.FINISH_REASON_UNSPECIFIED,
                                                             pb.FINISH_REASON_LENGTH]
        assert not any(r.logprobs for r in responses)


def test_eight_concurrent_streams_equal_engine(stub, reference):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist()
               for n in (3, 60, 17, 5, 33, 9, 48, 21)]
    lengths = [40, 4, 25, 33, 12, 7, 19, 30]
    expected = reference.generate(prompts, [_engine_params(n) for n in lengths])

    def run(i: int) -> tuple[list[int], str]:
        request = pb.GenerateRequest(request_id=f"c{i}", token_ids=pb.TokenIds(ids=prompts[i]),
                                     sampling=_greedy(lengths[i]))
        responses = list(stub.Generate(request, timeout=60))
        return [t for r in responses for t in r.token_ids], "".join(r.text for r in responses)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    for (ids, text), completion in zip(results, expected, strict=True):
        assert ids == completion.token_ids
        assert text == completion.text


def test_logprobs_when_asked(stub, reference):
    prompt = reference.tokenizer.encode("logprobs please")
    request = pb.GenerateRequest(request_id="lp", text="logprobs please",
                                 sampling=_greedy(6, logprobs=3))
    responses = list(stub.Generate(request, timeout=30))
    expected = reference.generate([prompt], _engine_params(6, logprobs=3))[0]
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == expected.token_ids
    for got, want in zip(logprobs, expected.logprobs, strict=True):
        assert list(got.top_token_ids) == want.top_token_ids and len(want.top_token_ids) == 3
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert list(got.top_logprobs) == pytest.approx(want.top_logprobs, abs=1e-4)


@pytest.mark.parametrize("request_fields, words", [
    ({"text": ""}, "empty"),
    ({"token_ids": pb.TokenIds(ids=[])}, "empty"),
    ({"token_ids": pb.TokenIds(ids=[5, VOCAB_SIZE, -1])}, f"[0, {VOCAB_SIZE})"),
    ({"text": "hi", "sampling": pb.SamplingParams(top_p=1.5)}, "top_p must be in (0, 1], got 1.5"),
    ({"text": "hi", "sampling": pb.SamplingParams(max_tokens=0)}, "max_tokens"),
    ({"text": "hi", "sampling": pb.SamplingParams(logprobs=50)}, "logprobs"),
    ({}, "no input"),
    ({"text": "hi", "disaggregation": pb.DisaggregationInfo(room="r")}, "null mode"),
])
def test_bad_input_is_invalid_argument(stub, request_fields, words):
    request = pb.GenerateRequest(request_id="bad", **request_fields)
    code, details = _status(lambda: stub.Generate(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in details


def test_too_long_prompt_names_the_numbers(servers):
    stub = servers["short"].ready().stub()
    assert stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5).max_model_len == 32
    request = pb.GenerateRequest(request_id="long", text="x" * 40)
    code, details = _status(lambda: stub.Generate(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "40 tokens" in details and "32" in details


def test_duplicate_live_request_id_is_already_exists(stub):
    live = stub.Generate(pb.GenerateRequest(request_id="dup", text="a", sampling=_greedy(400)))
    next(live)
    code, details = _status(lambda: stub.Generate(
        pb.GenerateRequest(request_id="dup", text="b", sampling=_greedy(2)), timeout=10))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "dup" in details
    live.cancel()
    _wait_all_pages_free(stub)
    again = list(stub.Generate(pb.GenerateRequest(request_id="dup", text="b",
                                                  sampling=_greedy(2)), timeout=10))
    assert again[-1].usage.completion_tokens == 2


def test_cancelled_stream_frees_its_pages(stub):
    baseline = _wait_all_pages_free(stub)
    assert baseline.num_free_pages == baseline.num_pages > 0
    call = stub.Generate(pb.GenerateRequest(request_id="cancel", text="y" * 10,
                                            sampling=_greedy(500)))
    next(call)
    busy = stub.GetLoad(pb.LoadRequest(), timeout=5)
    assert busy.num_running == 1 and busy.num_free_pages < busy.num_pages
    call.cancel()
    # 60 steps after the cancel, a request of 500 tokens that was not aborted still runs.
    witness = list(stub.Generate(pb.GenerateRequest(request_id="witness", text="w",
                                                    sampling=_greedy(60)), timeout=30))
    assert witness[-1].usage.completion_tokens == 60
    load = stub.GetLoad(pb.LoadRequest(), timeout=5)
    assert (load.num_running, load.num_waiting, load.num_free_pages) == (0, 0, load.num_pages)


def test_sigterm_drains_a_running_stream_and_exits_0(servers):
    server = servers["drain"].ready()
    call = server.stub().Generate(pb.GenerateRequest(request_id="drain", text="z",
                                                     sampling=_greedy(400)))
    first = next(call)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(call)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 400
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.proc.wait(30) == 0
    assert "draining 1 live request" in server.log.read_text()


def test_embedded_model_knows_the_capital_of_france(servers):
    stub = servers["embedded"].ready().stub()
    chat = pb.ChatMessages(messages=[pb.ChatMessage(
        role="user", content="What is the capital of France?")], add_generation_prompt=True)
    responses = list(stub.Generate(pb.GenerateRequest(
        request_id="paris", chat=chat, sampling=pb.SamplingParams(max_tokens=16, temperature=0)),
        timeout=60))
    assert "Paris" in "".join(r.text for r in responses)


@pytest.mark.parametrize("flags, words", [
    (["--tp-size", "2"], "--tp-size 2"),
    (["--enable-dp-attention"], "--enable-dp-attention"),
    (["--disaggregation-mode", "prefill", "--dp-size", "8"], "--dp-size 8"),
    (["--disaggregation-mode", "decode", "--nnodes", "2"], "--nnodes 2"),
])
def test_unsupported_flags_exit_fast_with_one_line(flags, words):
    start = time.monotonic()
    done = subprocess.run([TANDEM, "serve", *flags], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and words in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 5


def test_bad_model_path_exits_with_one_line(tmp_path):
    done = subprocess.run([TANDEM, "serve", "--model-path", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert str(tmp_path / "nope") in done.stderr and "Traceback" not in done.stderr


class _BrokenServicer(worker_pb2_grpc.GenerateServiceServicer):
    async def GetLoad(self, request, context):
        raise RuntimeError("kaboom in GetLoad")

    async def Generate(self, request, context):
        yield pb.GenerateResponse(token_ids=[1])
        raise RuntimeError("kaboom in Generate")


def test_interceptor_answers_unexpected_errors_with_internal(caplog):
    async def body() -> list[tuple[grpc.StatusCode, str]]:
        server = grpc.aio.server(interceptors=[ExceptionInterceptor()])
        worker_pb2_grpc.add_GenerateServiceServicer_to_server(_BrokenServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        errors = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = worker_pb2_grpc.GenerateServiceStub(channel)
                try:
                    await stub.GetLoad(pb.LoadRequest(), timeout=5)
                except grpc.aio.AioRpcError as e:
                    errors.append((e.code(), e.details()))
                call = stub.Generate(pb.GenerateRequest(), timeout=5)
                assert list((await call.read()).token_ids) == [1]
                try:
                    await call.read()
                except grpc.aio.AioRpcError as e:
                    errors.append((e.code(), e.details()))
        finally:
            await server.stop(None)
        return errors

    with caplog.at_level(logging.ERROR, logger="services.decode.server"):
        errors = asyncio.run(body())
    assert [code for code, _ in errors] == [grpc.StatusCode.INTERNAL] * 2
    assert "GetLoad: internal error" in errors[0][1] and "kaboom" not in errors[0][1]
    assert "RuntimeError: kaboom in GetLoad" in caplog.text
    assert "RuntimeError: kaboom in Generate" in caplog.text
