"""Ready flags between two real kvds over NIXL: a decode worker that accepts one is answered
while its room's KV is still in flight, and the flag then says how the room ended.

On this CPU VM the transports finish a NIXL write before the prefill kvd's in-flight
notification can overtake it (a CMA put copies inside the post; over TCP the notification
queues behind the bytes), so the tests send that early report themselves, by the TransferDone
RPC in the prefill kvd's name, before the prefill side writes anything: the decode kvd's
answer, flag and ending are then deterministic. The prefill side's sending of it is tested in
test_notifications.py, and on GPUs (where the post only queues the copy) by
tests/pd/test_pd_gpu.py and bench/kv_transfer_gpu.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from services.common.kvd_client import map_ready_flags
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.common.ready_flags import LandingState
from tests.kvd.test_kvd import SHORT, _attach, _client, _unpinned, kvd_samples
from tests.procs import kill, start_kvd, stop

LAYOUT = kvd_pb2.KvLayout(num_pages=32, num_layers=2, page_size=16, num_kv_heads=2,
                          head_dim=32, dtype="float32", model="tiny")
ROOM_PAGES = [5, 6, 7, 20, 21]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    a, b = start_kvd(tmp, "a", "nixl", env=SHORT), start_kvd(tmp, "b", "nixl", env=SHORT)
    yield a, b
    for proc, _, _ in (a, b):
        assert proc.poll() is not None or stop(proc) == 0


async def early_answers(stub) -> float:
    """The kvd's tandem_kvd_early_answers_total."""
    return sum(s.value for s in await kvd_samples(stub, "tandem_kvd_early_answers_total"))


async def kvd_id_at(address: str) -> str:
    """The id of the kvd whose peer service is at `address` (its Heartbeat answer)."""
    async with grpc.aio.insecure_channel(address) as channel:
        return (await kvd_pb2_grpc.KvdPeerServiceStub(channel).Heartbeat(
            kvd_pb2.HeartbeatRequest(kvd_id="test"))).kvd_id


async def report_in_flight(prefill_address: str, decode_stub, decode_address: str, room: str,
                           aux: kvd_pb2.RoomAux) -> None:
    """What the in-flight notification of the kvd at `prefill_address` says, in its name, by
    RPC to the decode kvd (see the module doc), once that kvd expects a room (a report before
    would be refused)."""
    prefill_id = await kvd_id_at(prefill_address)
    for _ in range(500):
        if (await decode_stub.Stats(kvd_pb2.StatsRequest())).open_rooms > 0:
            break
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(decode_address) as channel:
        await kvd_pb2_grpc.KvdPeerServiceStub(channel).TransferDone(kvd_pb2.TransferDoneRequest(
            room=room, kvd_id=prefill_id, in_flight=True, aux=aux))


async def _until_final(landing, seconds: float = 10.0) -> LandingState:
    deadline = time.monotonic() + seconds
    while (state := landing.poll()) is LandingState.PENDING and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    return state


class Room:
    """One room from kvd a (prefill) to kvd b (decode): both pools attached, the source
    filled, b's ExpectKv started (and bootstrapped at a)."""

    def __init__(self, a, b, addr_a: str, addr_b: str, name: str) -> None:
        self.a, self.b, self.addr_a, self.addr_b, self.name = a, b, addr_a, addr_b, name

    async def expect(self, accept_flag: bool = True) -> None:
        (self.pa, self.va), (self.pb, self.vb) = (await _attach(self.a, f"{self.name}-p", LAYOUT),
                                                  await _attach(self.b, f"{self.name}-d", LAYOUT))
        self.va[:] = np.random.default_rng(1).integers(0, 255, self.va.size, dtype=np.uint8)
        self.vb[:] = 0
        self.flags = map_ready_flags(self.pb, LAYOUT.num_pages)
        self.expecting = asyncio.ensure_future(self.b.ExpectKv(kvd_pb2.ExpectKvRequest(
            pool_id=self.pb.pool_id, room=self.name, page_ids=ROOM_PAGES,
            peer_address=self.addr_a, accept_ready_flag=accept_flag)))

    async def report_in_flight(self) -> None:
        await report_in_flight(self.addr_a, self.b, self.addr_b, self.name,
                               kvd_pb2.RoomAux(first_token_id=7, cached_tokens=3))

    def send(self) -> asyncio.Future:
        return asyncio.ensure_future(self.a.SendKv(kvd_pb2.SendKvRequest(
            pool_id=self.pa.pool_id, room=self.name, page_ids=list(range(5)),
            peer_address=self.addr_b, aux=kvd_pb2.RoomAux(first_token_id=7, cached_tokens=3))))

    def landing(self, got: kvd_pb2.ExpectKvResponse):
        return self.flags.landing(got.ready_flag.index, got.ready_flag.ticket)

    async def answered_early(self):
        """expect + the in-flight report: the pending landing the early answer carries."""
        await self.expect()
        await self.report_in_flight()
        landing = self.landing(await asyncio.wait_for(self.expecting, 5.0))
        assert landing.poll() is LandingState.PENDING
        return landing

    def landed_exactly(self) -> bool:
        page = self.pa.total_bytes // LAYOUT.num_pages
        return all((self.vb[d * page:(d + 1) * page] == self.va[s * page:(s + 1) * page]).all()
                   for s, d in zip(range(5), ROOM_PAGES, strict=True))


def test_answered_in_flight_then_flag_says_landed(pair):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = pair

    async def run():
        room = Room(_client(sock_a), _client(sock_b), addr_a, addr_b, "r-land")
        before = await early_answers(room.b)
        await room.expect()
        assert not room.expecting.done()
        await room.report_in_flight()
        got = await asyncio.wait_for(room.expecting, 5.0)  # answered with nothing written yet
        assert got.HasField("ready_flag") and got.aux.first_token_id == 7
        assert got.aux.cached_tokens == 3
        assert got.ready_flag.index == ROOM_PAGES[0] and got.ready_flag.ticket > 0
        landing = room.landing(got)
        assert landing.poll() is LandingState.PENDING
        assert await early_answers(room.b) == before + 1
        await room.send()
        assert await _until_final(landing) is LandingState.LANDED
        assert room.landed_exactly()
        assert await _unpinned(room.a) and await _unpinned(room.b)

    asyncio.run(run())


def test_without_a_flag_the_answer_waits_for_the_landing(pair):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = pair

    async def run():
        room = Room(_client(sock_a), _client(sock_b), addr_a, addr_b, "r-noflag")
        await room.expect(accept_flag=False)
        await room.report_in_flight()
        await asyncio.sleep(0.2)
        assert not room.expecting.done()  # the in-flight report alone answers nobody
        await room.send()
        got = await asyncio.wait_for(room.expecting, 5.0)
        assert not got.HasField("ready_flag") and got.aux.first_token_id == 7
        assert room.landed_exactly()
        assert await _unpinned(room.a) and await _unpinned(room.b)

    asyncio.run(run())


def test_release_after_an_early_answer_settles_the_flag_first(pair):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = pair

    async def run():
        room = Room(_client(sock_a), _client(sock_b), addr_a, addr_b, "r-rel")
        landing = await room.answered_early()
        await room.b.ReleaseRoom(kvd_pb2.ReleaseRoomRequest(room="r-rel"))
        # final the moment ReleaseRoom returns: the worker may free the pages then
        assert landing.poll() is LandingState.FAILED
        assert await _unpinned(room.b)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a cancelled it: no late write
            await room.send()
        assert refused.value.code() == grpc.StatusCode.ABORTED
        assert not room.vb.any()
        assert await _unpinned(room.a)

    asyncio.run(run())


def test_an_error_report_after_an_early_answer_fails_the_flag(pair):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = pair

    async def run():
        room = Room(_client(sock_a), _client(sock_b), addr_a, addr_b, "r-err")
        landing = await room.answered_early()
        async with grpc.aio.insecure_channel(addr_b) as channel:
            await kvd_pb2_grpc.KvdPeerServiceStub(channel).TransferDone(
                kvd_pb2.TransferDoneRequest(room="r-err", kvd_id=await kvd_id_at(addr_a),
                                            error="disk on fire"))
        assert await _until_final(landing) is LandingState.FAILED
        assert await _unpinned(room.b)
        await room.b.ReleaseRoom(kvd_pb2.ReleaseRoomRequest(room="r-err"))  # nothing left
        assert await _unpinned(room.a)

    asyncio.run(run())


def test_prefill_kvd_killed_after_an_early_answer_flag_says_failed(tmp_path):
    a_proc, sock_a, addr_a = start_kvd(tmp_path, "a", "nixl", env=SHORT)
    b_proc, sock_b, addr_b = start_kvd(tmp_path, "b", "nixl", env=SHORT)
    try:
        async def run():
            room = Room(_client(sock_a), _client(sock_b), addr_a, addr_b, "r-kill")
            landing = await room.answered_early()
            kill(a_proc)
            started = time.monotonic()
            # heartbeats: 2 misses 0.3 s apart; then the drain finds the peer gone
            assert await _until_final(landing, 10.0) is LandingState.FAILED
            assert time.monotonic() - started < 5.0
            assert await _unpinned(room.b)

        asyncio.run(run())
    finally:
        kill(a_proc)
        assert stop(b_proc) == 0
