"""AheadSend, the prefill worker's side of SendKvAhead, against two real kvd processes:
announced then finished, finished without an announce, cancelled after the announce (the
decode side fails at once), and pages that change between announce and finish."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from services.common.kvd_client import RoomFailed
from services.common.proto.tandem.v1 import kvd_pb2
from services.engine.kv_events import KvComputed
from services.engine.output import RequestOutput
from services.prefill.kv_sender import AheadSend
from tests.kvd.test_kvd import LAYOUT, _attach, _client, _pinned, _unpinned, kvd_pair


@pytest.fixture(scope="module")
def two_kvds(tmp_path_factory):
    yield from kvd_pair(tmp_path_factory, "kv-sender")


def _first(pages: list[int], token: int = 9) -> RequestOutput:
    return RequestOutput("r", [token], "", finished=True, num_prompt_tokens=8,
                         num_cached_tokens=2, kv_page_ids=pages)


async def _expect(stub, pool_id: str, room: str, pages: list[int], peer: str) -> asyncio.Future:
    expect = asyncio.ensure_future(stub.ExpectKv(kvd_pb2.ExpectKvRequest(
        pool_id=pool_id, room=room, page_ids=pages, peer_address=peer, timeout_seconds=30)))
    await asyncio.sleep(0.3)  # bootstrapped at the prefill kvd
    return expect


@pytest.mark.parametrize("announced", [True, False])
def test_finish_delivers_kv_and_first_token(two_kvds, announced):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        tag = f"fin-{announced}"
        (pa, va), (pb, vb) = await _attach(a, f"{tag}-p"), await _attach(b, f"{tag}-d")
        page = pa.total_bytes // LAYOUT.num_pages
        va[:] = np.random.default_rng(2).integers(0, 255, va.size, dtype=np.uint8)
        expect = await _expect(b, pb.pool_id, tag, [20, 21], addr_a)
        sender = AheadSend(a, pa.pool_id, tag, addr_b)
        if announced:
            sender.announce(KvComputed("r", [4, 5], b""))
            await asyncio.sleep(0.3)
            assert sender.was_announced and not expect.done()  # no first token yet
        sent = await sender.finish(_first([4, 5]))
        got = await expect
        assert got.aux.first_token_id == 9 and got.aux.cached_tokens == 2
        assert sent.kv_bytes == got.kv_bytes == 2 * page
        assert (vb[20 * page:22 * page] == va[4 * page:6 * page]).all()
        sender.cancel()  # after finish: nothing
        sender.announce(KvComputed("r", [4, 5], b""))  # after finish: ignored
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


def test_cancel_after_announce_fails_the_decode_side_at_once(two_kvds):
    """The prefill engine failed after announcing (e.g. while sampling): the decode side
    hears of it now, not after its 30 s wait."""
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, "cancel-p"), await _attach(b, "cancel-d")
        expect = await _expect(b, pb.pool_id, "cancel", [1, 2], addr_a)
        sender = AheadSend(a, pa.pool_id, "cancel", addr_b)
        sender.announce(KvComputed("r", [3, 4], b""))
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sender.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert loop.time() - start < 5.0
        assert await _unpinned(a) and await _pinned(b) == 0

    asyncio.run(run())


def test_pages_that_changed_since_the_announce_cancel_the_room(two_kvds):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, "moved-p"), await _attach(b, "moved-d")
        expect = await _expect(b, pb.pool_id, "moved", [1, 2], addr_a)
        sender = AheadSend(a, pa.pool_id, "moved", addr_b)
        sender.announce(KvComputed("r", [3, 4], b""))
        await asyncio.sleep(0.3)  # the forward pass runs: the request reaches kvd meanwhile
        with pytest.raises(RuntimeError, match="announced pages"):
            await sender.finish(_first([3, 5]))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _unpinned(a) and await _pinned(b) == 0

    asyncio.run(run())


def test_a_refused_send_raises_room_failed(two_kvds):
    """No decode side ever bootstraps the room: kvd's bootstrap timeout (2 s here) is
    RoomFailed with kvd's status."""
    (_, sock_a, _), (_, _, addr_b) = two_kvds

    async def run():
        a = _client(sock_a)
        pa, _ = await _attach(a, "lonely-ahead-p")
        sender = AheadSend(a, pa.pool_id, "lonely-ahead", addr_b)
        sender.announce(KvComputed("r", [1], b""))
        with pytest.raises(RoomFailed) as e:
            await sender.finish(_first([1]))
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _pinned(a) == 0

    asyncio.run(run())
