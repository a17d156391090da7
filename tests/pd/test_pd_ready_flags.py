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
import uuid

import grpc
import pytest

from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc, worker_pb2
from tests.kvd.test_ready_flags import early_answers, report_in_flight
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


async def _report_in_flight(a: Node, b: Node, room: str) -> None:
    """What a's in-flight notification would say, once b expects the room."""
    async with grpc.aio.insecure_channel(f"unix:{b.socket}") as ch:
        await report_in_flight(a.kvd_address, kvd_pb2_grpc.KvdServiceStub(ch), b.kvd_address,
                               room, kvd_pb2.RoomAux(first_token_id=FIRST_TOKEN))


async def _early_answers(b: Node) -> float:
    async with grpc.aio.insecure_channel(f"unix:{b.socket}") as ch:
        return await early_answers(kvd_pb2_grpc.KvdServiceStub(ch))


async def _answered_early(a: Node, b: Node, decode: str) -> tuple[str, asyncio.Future]:
    """A room's decode leg at `decode`, its prefill side played by kvd a, once the client has
    its first token (kvd b answered the worker early): (room, the leg)."""
    room = uuid.uuid4().hex
    first = asyncio.Event()
    leg = asyncio.ensure_future(decode_leg(decode, _request(), room, a.kvd_address,
                                           timeout=60, started=first))
    await _report_in_flight(a, b, room)
    await asyncio.wait_for(first.wait(), 10)
    return room, leg


def _request() -> worker_pb2.GenerateRequest:
    return pd_request(list(range(3, 40)), max_tokens=8)


def test_prefill_kvd_dying_after_an_early_answer_ends_the_stream_unavailable(cluster):
    a, b, decode = cluster

    async def run():
        room, leg = await _answered_early(a, b, decode)
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
        _, leg = await _answered_early(a, b, decode)
        leg.cancel()
        await asyncio.gather(leg, return_exceptions=True)
        # the worker released the room: kvd cancelled it at a and settled the flag, and the
        # engine freed the pages it kept meanwhile — long before any timeout
        await wait_baseline([a, b], [(decode, "decode")], timeout=10)

    asyncio.run(run())
