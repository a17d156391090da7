"""A PD deployment of real processes for tests: kvds, prefill and decode workers, and the
client side of the KV path (what the gateway does): one room per request, both legs at once."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.procs import free_port, in_netns, start, start_kvd, stop, wait_healthy


@dataclass
class Node:
    kvd: object  # Popen
    socket: str
    kvd_address: str


@dataclass
class Deployment:
    backend: str = "nixl"
    prefill: list[object] = field(default_factory=list)  # (proc, port)
    decode: list[object] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)

    def stop_all(self) -> None:
        for proc, _ in self.prefill + self.decode:
            stop(proc)
        for node in self.nodes:
            stop(node.kvd)


def start_node(tmp: Path, name: str, backend: str, env: dict[str, str] | None = None) -> Node:
    port = free_port()
    proc, sock, address = start_kvd(tmp, name, backend, env=env) if port else (None, "", "")
    return Node(proc, sock, address)


def start_worker(tmp: Path, mode: str, model: str, node: Node, backend: str,
                 extra: list[str] | None = None, env: dict[str, str] | None = None):
    port = free_port()
    kvd_port = node.kvd_address.rsplit(":", 1)[1]
    args = ["-m", "services.cli", "serve", "--model-path", model, "--disaggregation-mode", mode,
            "--port", str(port), "--kvd-socket", node.socket, "--kvd-port", kvd_port,
            "--disaggregation-transfer-backend", backend, "--page-size", "4",
            "--num-kv-pages", "512", *(extra or [])]
    proc = start(args, tmp / f"{mode}-{port}.log", env)
    wait_healthy(f"127.0.0.1:{port}", proc, timeout=120)
    return proc, port


async def kvd_pinned(node: Node) -> int:
    async with grpc.aio.insecure_channel(f"unix:{node.socket}") as ch:
        stats = await kvd_pb2_grpc.KvdServiceStub(ch).Stats(kvd_pb2.StatsRequest())
    return sum(p.pinned_pages for p in stats.pools) + stats.open_rooms


async def pd_generate(prefill_port: int, decode_port: int, prefill_kvd: str, decode_kvd: str,
                      request: worker_pb2.GenerateRequest, timeout: float = 60.0
                      ) -> tuple[list[int], str, worker_pb2.PrefillResponse]:
    """Both legs of one request, concurrently, as the gateway dispatches them."""
    room = uuid.uuid4().hex
    decode_req = worker_pb2.GenerateRequest()
    decode_req.CopyFrom(request)
    decode_req.disaggregation.CopyFrom(worker_pb2.DisaggregationInfo(
        room=room, peer_kvd_address=prefill_kvd))
    prefill_req = worker_pb2.GenerateRequest()
    prefill_req.CopyFrom(request)
    prefill_req.disaggregation.CopyFrom(worker_pb2.DisaggregationInfo(
        room=room, peer_kvd_address=decode_kvd))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{prefill_port}") as pch, \
            grpc.aio.insecure_channel(f"127.0.0.1:{decode_port}") as dch:
        decode = worker_pb2_grpc.GenerateServiceStub(dch)
        prefill = worker_pb2_grpc.PrefillServiceStub(pch)

        async def decode_leg():
            ids, text = [], ""
            async for r in decode.Generate(decode_req, timeout=timeout):
                ids.extend(r.token_ids)
                text += r.text
            return ids, text

        (ids, text), pre = await asyncio.gather(
            decode_leg(), prefill.Prefill(worker_pb2.PrefillRequest(request=prefill_req),
                                          timeout=timeout))
    return ids, text, pre


async def worker_load(port: int) -> worker_pb2.LoadResponse:
    """Load of a prefill or decode worker (both services answer GetLoad)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        try:
            return await worker_pb2_grpc.GenerateServiceStub(ch).GetLoad(worker_pb2.LoadRequest())
        except grpc.aio.AioRpcError:
            return await worker_pb2_grpc.PrefillServiceStub(ch).GetLoad(worker_pb2.LoadRequest())


# --- workers anywhere (another host address, a network namespace), legs one at a time -----


def launch_worker(tmp: Path, mode: str, model: str, node: Node, backend: str, *,
                  port: int | None = None, host: str = "127.0.0.1", netns: str | None = None,
                  extra: list[str] | None = None, env: dict[str, str] | None = None):
    """A prefill/decode worker listening on host:port (inside `netns` if given; the same port
    again is a restart, which re-attaches to its pool); returns (proc, port)."""
    port = port or free_port()
    kvd_port = node.kvd_address.rsplit(":", 1)[1]
    args = ["-m", "services.cli", "serve", "--model-path", model, "--disaggregation-mode", mode,
            "--host", host, "--port", str(port), "--kvd-socket", node.socket,
            "--kvd-port", kvd_port, "--disaggregation-transfer-backend", backend,
            "--page-size", "4", "--num-kv-pages", "512", *(extra or [])]
    proc = start(in_netns(netns, args) if netns else args, tmp / f"{mode}-{port}.log", env)
    wait_healthy(f"{host}:{port}", proc, timeout=120)
    return proc, port


def pd_request(prompt: list[int], max_tokens: int) -> worker_pb2.GenerateRequest:
    """A greedy request for `max_tokens` tokens that ignores EOS (deterministic length)."""
    return worker_pb2.GenerateRequest(
        token_ids=worker_pb2.TokenIds(ids=prompt),
        sampling=worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True))


def _with_room(request: worker_pb2.GenerateRequest, room: str,
               peer_kvd: str) -> worker_pb2.GenerateRequest:
    leg = worker_pb2.GenerateRequest()
    leg.CopyFrom(request)
    leg.disaggregation.CopyFrom(worker_pb2.DisaggregationInfo(room=room,
                                                              peer_kvd_address=peer_kvd))
    return leg


async def decode_leg(target: str, request: worker_pb2.GenerateRequest, room: str,
                     prefill_kvd: str, timeout: float = 60.0,
                     started: asyncio.Event | None = None) -> list[int]:
    """The decode leg of `room` at worker `target` (host:port): its token ids; AioRpcError on
    failure. `started` is set at the first streamed token."""
    ids: list[int] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stream = worker_pb2_grpc.GenerateServiceStub(ch).Generate(
            _with_room(request, room, prefill_kvd), timeout=timeout)
        async for r in stream:
            ids.extend(r.token_ids)
            if started is not None:
                started.set()
    return ids


async def prefill_leg(target: str, request: worker_pb2.GenerateRequest, room: str,
                      decode_kvd: str, timeout: float = 60.0) -> worker_pb2.PrefillResponse:
    """The prefill leg of `room` at worker `target`; AioRpcError on failure."""
    async with grpc.aio.insecure_channel(target) as ch:
        return await worker_pb2_grpc.PrefillServiceStub(ch).Prefill(
            worker_pb2.PrefillRequest(request=_with_room(request, room, decode_kvd)),
            timeout=timeout)


async def pd_generate_at(prefill: str, decode: str, prefill_kvd: str, decode_kvd: str,
                         request: worker_pb2.GenerateRequest, timeout: float = 60.0
                         ) -> tuple[list[int], worker_pb2.PrefillResponse]:
    """Both legs of one request with a fresh room, concurrently, at workers host:port."""
    room = uuid.uuid4().hex
    return await asyncio.gather(decode_leg(decode, request, room, prefill_kvd, timeout),
                                prefill_leg(prefill, request, room, decode_kvd, timeout))


async def kvd_stats(node: Node) -> kvd_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(f"unix:{node.socket}") as ch:
        return await kvd_pb2_grpc.KvdServiceStub(ch).Stats(kvd_pb2.StatsRequest(), timeout=5.0)


async def load_at(target: str, mode: str) -> worker_pb2.LoadResponse:
    """GetLoad of the prefill or decode worker at host:port."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = (worker_pb2_grpc.PrefillServiceStub(ch) if mode == "prefill"
                else worker_pb2_grpc.GenerateServiceStub(ch))
        return await stub.GetLoad(worker_pb2.LoadRequest(), timeout=5.0)


async def wait_baseline(nodes: list[Node], workers: list[tuple[str, str]],
                        timeout: float = 10.0) -> float:
    """Poll until every kvd pins no page and has no open room, and every worker (target,
    mode) has all its pages free and nothing running; the seconds it took. AssertionError
    naming what is still held after `timeout`."""
    loop = asyncio.get_running_loop()
    start_time = deadline = loop.time()
    deadline += timeout
    while True:
        held = []
        for node in nodes:
            s = await kvd_stats(node)
            pinned = sum(p.pinned_pages for p in s.pools)
            if pinned or s.open_rooms:
                held.append(f"kvd {node.kvd_address}: {pinned} pinned, {s.open_rooms} open rooms")
        for target, mode in workers:
            load = await load_at(target, mode)
            if load.num_free_pages != load.num_pages or load.num_running or load.num_waiting:
                held.append(f"{mode} {target}: {load.num_free_pages}/{load.num_pages} free, "
                            f"{load.num_running} running, {load.num_waiting} waiting")
        if not held:
            return loop.time() - start_time
        if loop.time() > deadline:
            raise AssertionError(f"not back to baseline within {timeout:g}s: {'; '.join(held)}")
        await asyncio.sleep(0.05)


def unified_token_ids(model: str | Path, requests: list[tuple[list[int], int]]
                      ) -> list[list[int]]:
    """What the in-process unified engine answers to greedy (prompt, max_tokens) requests."""
    from services.engine.config import ModelConfig
    from services.engine.engine import EngineConfig, LLMEngine
    from services.engine.model import LlamaModel
    from services.engine.sampling_params import SamplingParams
    from services.engine.weights import load_hf_weights

    engine = LLMEngine(LlamaModel(ModelConfig.from_hf_folder(model), load_hf_weights(model)),
                       None, EngineConfig(page_size=4, num_pages=512))
    results = engine.generate([p for p, _ in requests], [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in requests])
    return [r.token_ids for r in results]
