"""SendKvAhead between two real kvd processes: the KV announced first, the first token later.

The decode side must be answered only once both are there; a send that never brings its first
token fails the room on both sides and pins nothing afterwards; malformed or misplaced
messages are refused. (The CUDA event ordering of `source_ready_event` is a GPU test:
tests/kvd/test_vram_pools.py.)
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from services.common.proto.tandem.v1 import kvd_pb2
from tests.kvd.test_kvd import LAYOUT, _attach, _client, _pinned, _reports, _unpinned, kvd_pair


@pytest.fixture(scope="module")
def two_kvds(tmp_path_factory):
    yield from kvd_pair(tmp_path_factory, "kvd-ahead")


def _request(pool_id: str, room: str, pages: list[int], peer: str, **fields):
    return kvd_pb2.SendKvPart(request=kvd_pb2.SendKvRequest(
        pool_id=pool_id, room=room, page_ids=pages, peer_address=peer, **fields))


def _aux(token: int) -> kvd_pb2.SendKvPart:
    return kvd_pb2.SendKvPart(aux=kvd_pb2.RoomAux(first_token_id=token, cached_tokens=3))


async def _expect(stub, pool_id: str, room: str, pages: list[int], peer: str, prefill,
                  **fields) -> asyncio.Future:
    """ExpectKv at the decode kvd `stub`, returned once the prefill kvd (`prefill`, at `peer`)
    has the room's Bootstrap (as a prefill worker's AwaitBootstrap before its forward pass)."""
    expect = asyncio.ensure_future(stub.ExpectKv(kvd_pb2.ExpectKvRequest(
        pool_id=pool_id, room=room, page_ids=pages, peer_address=peer, **fields)))
    await prefill.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(
        room=room, timeout_seconds=10), timeout=15)
    await asyncio.sleep(0.1)  # and the Bootstrap's answer back at the decode kvd
    return expect


@pytest.mark.parametrize("same_node", [False, True])
def test_decode_side_is_answered_once_kv_and_first_token_are_there(two_kvds, same_node):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a = _client(sock_a)
        b = a if same_node else _client(sock_b)
        tag = "same" if same_node else "cross"
        (pa, va), (pb, vb) = await _attach(a, f"{tag}-ahead-p"), await _attach(b, f"{tag}-ahead-d")
        page = pa.total_bytes // LAYOUT.num_pages
        va[:] = np.random.default_rng(1).integers(0, 255, va.size, dtype=np.uint8)
        src, dst = [5, 6, 7], [10, 11, 40]
        before = await _reports(b)
        expect = await _expect(b, pb.pool_id, "ahead", dst, addr_a, a,
                                accept_ready_event=True)
        call = a.SendKvAhead()
        await call.write(_request(pa.pool_id, "ahead", src, addr_a if same_node else addr_b))
        await asyncio.sleep(0.5)  # the KV is written by now; the first token is not known
        assert not expect.done()
        await call.write(_aux(42))
        await call.done_writing()
        sent, got = await call, await expect
        assert got.aux.first_token_id == 42 and got.aux.cached_tokens == 3
        assert got.kv_bytes == sent.kv_bytes == 3 * page and got.ready_event == b""
        assert sent.backend == ("local" if same_node else "nixl") and sent.num_descriptors == 2
        # the first token came after the write landed: the loop told the decode side, by RPC
        # between kvds (no notification was ready when the write landed), in-process here
        via = "in_process" if same_node else "rpc"
        assert await _reports(b) == {**before, via: before[via] + 1}
        for s, d in zip(src, dst, strict=True):
            assert (vb[d * page:(d + 1) * page] == va[s * page:(s + 1) * page]).all()
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


@pytest.mark.parametrize("how", ["ended", "cancelled"])
def test_a_send_without_its_first_token_fails_both_sides_at_once(two_kvds, how):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, f"{how}-p"), await _attach(b, f"{how}-d")
        expect = await _expect(b, pb.pool_id, how, [1, 2], addr_a, a, timeout_seconds=30)
        call = a.SendKvAhead()
        await call.write(_request(pa.pool_id, how, [3, 4], addr_b))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        if how == "ended":  # the prefill worker's engine failed before sampling
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.ABORTED
            assert "without the first token" in e.value.details()
        else:  # the prefill worker went away
            call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert loop.time() - start < 5.0  # told, not timed out (30 s)
        # the prefill kvd's handler ends after the client's cancel
        assert await _unpinned(a) and await _pinned(b) == 0

    asyncio.run(run())


def test_a_first_token_that_never_comes_times_out_both_sides(two_kvds):
    """The prefill worker holds its stream open but sends nothing: the waiting timeout (2 s
    here) ends the room; nothing stays pinned."""
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, "mute-p"), await _attach(b, "mute-d")
        expect = await _expect(b, pb.pool_id, "mute", [1, 2], addr_a, a, timeout_seconds=30)
        call = a.SendKvAhead()
        await call.write(_request(pa.pool_id, "mute", [3, 4], addr_b))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call, 10)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "first token" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


def test_a_send_given_up_before_its_bootstrap_fails_the_decode_side_at_once(two_kvds):
    """The prefill side sends and gives up before the decode side's Bootstrap arrives: kvd
    refuses that late Bootstrap, so the decode side fails now instead of waiting (30 s)."""
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, "early-p"), await _attach(b, "early-d")
        call = a.SendKvAhead()
        await call.write(_request(pa.pool_id, "early", [3, 4], addr_b))
        for _ in range(100):  # the send waits for its bootstrap at the prefill kvd
            if (await a.Stats(kvd_pb2.StatsRequest())).open_rooms == 1:
                break
            await asyncio.sleep(0.05)
        call.cancel()
        assert await _unpinned(a)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await b.ExpectKv(kvd_pb2.ExpectKvRequest(
                pool_id=pb.pool_id, room="early", page_ids=[1, 2], peer_address=addr_a,
                timeout_seconds=30))
        assert e.value.code() == grpc.StatusCode.ABORTED and "gave up" in e.value.details()
        assert loop.time() - start < 5.0
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


def test_misplaced_malformed_or_impossible_messages_are_invalid_argument(two_kvds):
    (_, sock_a, addr_a), (_, _, addr_b) = two_kvds

    async def refused(parts) -> str:
        call = _client(sock_a).SendKvAhead()
        for part in parts:
            await call.write(part)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return e.value.details()

    async def run():
        a = _client(sock_a)
        pa, _ = await _attach(a, "bad-ahead-p")
        assert "first message" in await refused([_aux(1)])
        assert "first message" in await refused([])
        with_aux = kvd_pb2.SendKvPart(request=kvd_pb2.SendKvRequest(
            pool_id=pa.pool_id, room="x", page_ids=[1], peer_address=addr_b,
            aux=kvd_pb2.RoomAux(first_token_id=1)))
        assert "second message" in await refused([with_aux])
        assert "host memory" in await refused([_request(
            pa.pool_id, "x", [1], addr_b, source_ready_event=b"\x01" * 64)])
        async with grpc.aio.insecure_channel(f"unix:{sock_a}") as ch:
            call = ch.stream_unary("/tandem.v1.KvdService/SendKvAhead")()
            await call.write(b"\xff\xff\xff not a protobuf")
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in e.value.details()
        assert await _pinned(a) == 0

    asyncio.run(run())
