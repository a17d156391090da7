"""A PD deployment of real processes for tests: kvds, prefill and decode workers, and the
client side of the KV path (what the gateway does): one room per request, both legs at once."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.procs import free_port, start, start_kvd, stop, wait_healthy


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
