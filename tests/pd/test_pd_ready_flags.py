"""A real decode worker answered early by its kvd, with a ready flag, and what happens when the
room then fails or the client leaves: the client gets the first token, then a clear status or
nothing more, and the worker and both kvds return to their page baseline — the worker's
engine keeping the pages until kvd's flag says nothing can land in them any more.

The prefill side is played by the test: a bare kvd `a` takes the room's bootstrap, and the
test sends the decode kvd the in-flight report in a's name by RPC (on this CPU VM a real NIXL
write finishes before its in-flight notification could overtake it: tests/kvd/
test_ready_flags.py). No KV is ever written, so no test here decodes past the first token.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc, worker_pb2
from tests.pd.harness import Node, decode_leg, launch_worker, pd_request, start_node, wait_baseline
from tests.procs import kill, stop

HEARTBEAT = {"SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.3",
             "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2"}
# long: a baseline reached within seconds is the flag's doing, not a timeout's
LONG_WAIT = {"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "60",
             "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "60"}
FIRST_TOKEN = 11


@pytest.fixture
def cluster(tmp_path, model):
    """kvd a (the prefill node, no worker) and kvd b with a decode worker."""
    env = {**HEARTBEAT, **LONG_WAIT}
    a, b = start_node(tmp_path, "a", "nixl", env), start_node(tmp_path, "b", "nixl", env)
    decode, port = launch_worker(tmp_path, "decode", str(model), b, "nixl", env=LONG_WAIT)
    yield a, b, f"127.0.0.1:{port}"
    stop(decode)
    for node in (a, b):
        if node.kvd.poll() is None:
            stop(node.kvd)


async def _a_id(a: Node) -> str:
    async with grpc.aio.insecure_channel(a.kvd_address) as ch:
        reply = await kvd_pb2_grpc.KvdPeerServiceStub(ch).Heartbeat(
            kvd_pb2.HeartbeatRequest(kvd_id="test"))
    return reply.kvd_id


async def _report_in_flight(a: Node, b: Node, room: str) -> None:
    """What a's in-flight notification would say, once b expects the room."""
    a_id = await _a_id(a)
    async with grpc.aio.insecure_channel(f"unix:{b.socket}") as ch:
        stub = kvd_pb2_grpc.KvdServiceStub(ch)
        for _ in range(500):
            if (await stub.Stats(kvd_pb2.StatsRequest())).open_rooms:
                break
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # b's bootstrap at a: the report is taken only from a room's peer
    async with grpc.aio.insecure_channel(b.kvd_address) as ch:
        await kvd_pb2_grpc.KvdPeerServiceStub(ch).TransferDone(kvd_pb2.TransferDoneRequest(
            room=room, kvd_id=a_id, in_flight=True, kv_bytes=1,
            aux=kvd_pb2.RoomAux(first_token_id=FIRST_TOKEN)))


async def _early_answers(b: Node) -> float:
    async with grpc.aio.insecure_channel(f"unix:{b.socket}") as ch:
        stats = await kvd_pb2_grpc.KvdServiceStub(ch).Stats(kvd_pb2.StatsRequest())
    with urllib.request.urlopen(f"http://{stats.metrics_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "tandem_kvd_early_answers_total")


def _request() -> worker_pb2.GenerateRequest:
    return pd_request(list(range(3, 40)), max_tokens=8)


def test_prefill_kvd_dying_after_an_early_answer_ends_the_stream_unavailable(cluster):
    a, b, decode = cluster

    async def run():
        room = uuid.uuid4().hex
        first = asyncio.Event()
        leg = asyncio.ensure_future(decode_leg(decode, _request(), room, a.kvd_address,
                                               timeout=60, started=first))
        await _report_in_flight(a, b, room)
        await asyncio.wait_for(first.wait(), 10)  # the first token is out: answered early
        assert await _early_answers(b) == 1
        kill(a.kvd)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await leg
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert room in failed.value.details()
        assert time.monotonic() - started < 10  # heartbeats, not the 60 s waiting timeout
        await wait_baseline([b], [(decode, "decode")], timeout=10)

    asyncio.run(run())


def test_a_client_leaving_after_an_early_answer_frees_everything_at_once(cluster):
    a, b, decode = cluster

    async def run():
        room = uuid.uuid4().hex
        first = asyncio.Event()
        leg = asyncio.ensure_future(decode_leg(decode, _request(), room, a.kvd_address,
                                               timeout=60, started=first))
        await _report_in_flight(a, b, room)
        await asyncio.wait_for(first.wait(), 10)
        leg.cancel()
        await asyncio.gather(leg, return_exceptions=True)
        # the worker released the room: kvd cancelled it at a and settled the flag, and the
        # engine freed the pages it kept meanwhile — long before any timeout
        await wait_baseline([a, b], [(decode, "decode")], timeout=10)

    asyncio.run(run())
