"""Two real kvd processes move KV pages between pools they own, over a real backend."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.kvd_client import map_ready_flags
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.common.ready_flags import LandingState
from services.common.shm import SHM_DIR, map_segment
from services.kvd import notifications
from tests.procs import start_kvd, start_kvd_at, stop

LAYOUT = kvd_pb2.KvLayout(
    num_pages=64,
    num_layers=2,
    page_size=4,
    num_kv_heads=2,
    head_dim=8,
    dtype="float32",
    model="tiny",
)
SHORT = {
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "2",
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "2",
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": "0.3",
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": "2",
}


def _start_pair(tmp_path, backend):
    return (
        start_kvd(tmp_path, "a", backend, env=SHORT),
        start_kvd(tmp_path, "b", backend, env=SHORT),
    )


def kvd_pair(tmp_path_factory, name: str):
    """Two nixl kvds for a module's tests (`yield from` it in a module fixture); both must
    exit cleanly afterwards."""
    a, b = _start_pair(tmp_path_factory.mktemp(name), "nixl")
    yield a, b
    for proc, _, _ in (a, b):
        assert stop(proc) == 0


@pytest.fixture(scope="module", params=["nixl"])
def two_kvds(request, tmp_path_factory):
    """Shared by the tests of this module: each uses its own worker ids and rooms."""
    a, b = _start_pair(tmp_path_factory.mktemp("kvd"), request.param)
    yield a, b
    for proc, _, _ in (a, b):
        was_killed = proc.poll() is not None
        code = stop(proc)
        assert was_killed or code == 0


def _client(sock: str) -> kvd_pb2_grpc.KvdServiceStub:
    return kvd_pb2_grpc.KvdServiceStub(grpc.aio.insecure_channel(f"unix:{sock}"))


async def _attach(stub, worker: str, layout=LAYOUT):
    reply = await stub.AttachPool(kvd_pb2.AttachPoolRequest(worker_id=worker, layout=layout))
    view = np.frombuffer(map_segment(reply.segment_name, reply.total_bytes), dtype=np.uint8)
    return reply, view


async def _pinned(stub) -> int:
    stats = await stub.Stats(kvd_pb2.StatsRequest())
    return sum(p.pinned_pages for p in stats.pools) + stats.open_rooms


async def _unpinned(stub, seconds: float = 5.0) -> bool:
    """Whether the kvd's pins and open rooms drop to 0 within `seconds` (a handler may still
    be ending, a room draining)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while await _pinned(stub) != 0:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def kvd_samples(stub, name: str) -> list:
    """The samples named `name` (e.g. tandem_kvd_transfer_done_total) on the kvd's /metrics."""
    stats = await stub.Stats(kvd_pb2.StatsRequest())
    with urllib.request.urlopen(f"http://{stats.metrics_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


async def _reports(stub) -> dict[str, float]:
    """The kvd's tandem_kvd_transfer_done_total by how the reports came."""
    counts = {"notification": 0.0, "rpc": 0.0, "in_process": 0.0}
    for sample in await kvd_samples(stub, "tandem_kvd_transfer_done_total"):
        counts[sample.labels["via"]] = sample.value
    return counts


def test_pages_cross_between_kvds_byte_exact(two_kvds):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, va), (pb, vb) = await _attach(a, "cross-p"), await _attach(b, "cross-d")
        page = pa.total_bytes // LAYOUT.num_pages
        va[:] = np.random.default_rng(0).integers(0, 255, va.size, dtype=np.uint8)
        src, dst = [3, 4, 5, 9, 10], [20, 21, 7, 30, 31]
        before = await _reports(b)
        expect = asyncio.ensure_future(
            b.ExpectKv(
                kvd_pb2.ExpectKvRequest(
                    pool_id=pb.pool_id, room="r1", page_ids=dst, peer_address=addr_a
                )
            )
        )
        sent = await a.SendKv(
            kvd_pb2.SendKvRequest(
                pool_id=pa.pool_id,
                room="r1",
                page_ids=src,
                peer_address=addr_b,
                aux=kvd_pb2.RoomAux(first_token_id=42, first_logprob=-0.5),
            )
        )
        got = await expect
        assert got.aux.first_token_id == 42 and got.kv_bytes == 5 * page
        assert sent.num_descriptors == 3 and sent.backend == "nixl"
        # the decode side heard of it by NIXL notification, from the writing thread, not by RPC
        assert await _reports(b) == {**before, "notification": before["notification"] + 1}
        for s, d in zip(src, dst, strict=True):
            assert (vb[d * page : (d + 1) * page] == va[s * page : (s + 1) * page]).all()
        untouched = np.ones(LAYOUT.num_pages, bool)
        untouched[dst] = False
        assert not vb.reshape(LAYOUT.num_pages, page)[untouched].any()
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


def test_same_node_rooms_copy_locally(two_kvds):
    """Host pools: a worker that accepts a ready event still gets the KV written (events
    are for GPU-to-GPU copies only)."""
    (_, sock_a, addr_a), _ = two_kvds

    async def run():
        a = _client(sock_a)
        (pp, vp), (pd, vd) = await _attach(a, "local-p"), await _attach(a, "local-d")
        page = pp.total_bytes // LAYOUT.num_pages
        vp[:] = 7
        expect = asyncio.ensure_future(
            a.ExpectKv(
                kvd_pb2.ExpectKvRequest(
                    pool_id=pd.pool_id, room="r", page_ids=[1, 2], peer_address=addr_a,
                    accept_ready_event=True,
                )
            )
        )
        sent = await a.SendKv(
            kvd_pb2.SendKvRequest(
                pool_id=pp.pool_id, room="r", page_ids=[8, 9], peer_address=addr_a
            )
        )
        got = await expect
        assert sent.backend == "local" and sent.num_descriptors == 1
        assert got.ready_event == b"" and got.kv_bytes == 2 * page
        assert (vd[page : 3 * page] == 7).all() and not vd[:page].any()

    asyncio.run(run())


def test_reattach_returns_the_same_pool_and_layout_mismatch_is_refused(two_kvds):
    (_, sock_a, _), _ = two_kvds

    async def run():
        a = _client(sock_a)
        first, _ = await _attach(a, "reattach")
        again = await a.AttachPool(kvd_pb2.AttachPoolRequest(worker_id="reattach", layout=LAYOUT))
        assert again.reattached and again.pool_id == first.pool_id
        other = kvd_pb2.KvLayout()
        other.CopyFrom(LAYOUT)
        other.page_size = 8
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await a.AttachPool(kvd_pb2.AttachPoolRequest(worker_id="reattach", layout=other))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(run())


def test_gpu_pool_on_a_gpu_kvd_lacks_is_refused_naming_it(two_kvds):
    """A GPU placement kvd cannot serve (no such GPU here, or no cuda-bindings) fails with the
    reason, creates no pool, and a host re-attach of the worker id still works afterwards."""
    (_, sock_a, _), _ = two_kvds

    async def run():
        a = _client(sock_a)
        placement = kvd_pb2.KvPlacement(gpu_index=5, gpu_uuid=b"\xee" * 16)
        before = await a.Stats(kvd_pb2.StatsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await a.AttachPool(kvd_pb2.AttachPoolRequest(worker_id="gpu-5", layout=LAYOUT,
                                                         placement=placement))
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION)
        assert ("GPU 5" in e.value.details() and "not visible to kvd" in e.value.details()
                or "cuda-bindings" in e.value.details())
        after = await a.Stats(kvd_pb2.StatsRequest())
        assert len(after.pools) == len(before.pools)
        reply, _ = await _attach(a, "gpu-5")  # the id is free: a host pool takes it
        assert not reply.reattached and reply.cuda_ipc_handle == b""

    asyncio.run(run())


def test_bad_requests_are_refused_precisely_and_pin_nothing(two_kvds):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, "bad-p"), await _attach(b, "bad-d")
        cases = [
            (
                b.ExpectKv(
                    kvd_pb2.ExpectKvRequest(
                        pool_id="nope", room="x", page_ids=[1], peer_address=addr_a
                    )
                ),
                "NOT_FOUND",
            ),
            (
                b.ExpectKv(
                    kvd_pb2.ExpectKvRequest(
                        pool_id=pb.pool_id, room="x", page_ids=[64], peer_address=addr_a
                    )
                ),
                "INVALID_ARGUMENT",
            ),
            (
                b.ExpectKv(
                    kvd_pb2.ExpectKvRequest(
                        pool_id=pb.pool_id, room="x", page_ids=[1, 1], peer_address=addr_a
                    )
                ),
                "INVALID_ARGUMENT",
            ),
            (
                b.ExpectKv(
                    kvd_pb2.ExpectKvRequest(
                        pool_id=pb.pool_id, room="x", page_ids=[], peer_address=addr_a
                    )
                ),
                "INVALID_ARGUMENT",
            ),
            (
                a.SendKv(
                    kvd_pb2.SendKvRequest(
                        pool_id=pa.pool_id, room="y", page_ids=[-1], peer_address=addr_b
                    )
                ),
                "INVALID_ARGUMENT",
            ),
        ]
        for call, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code().name == code, e.value.details()
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


def test_mismatched_layout_or_page_count_fails_both_sides(two_kvds):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        other = kvd_pb2.KvLayout()
        other.CopyFrom(LAYOUT)
        other.head_dim = 16
        (pa, _), (pb, _) = await _attach(a, "mismatch-p"), await _attach(b, "mismatch-d", other)
        expect = asyncio.ensure_future(
            b.ExpectKv(
                kvd_pb2.ExpectKvRequest(
                    pool_id=pb.pool_id, room="r", page_ids=[1], peer_address=addr_a
                )
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await a.SendKv(
                kvd_pb2.SendKvRequest(
                    pool_id=pa.pool_id, room="r", page_ids=[1], peer_address=addr_b
                )
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "head_dim" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect  # told at once by the prefill side, not left to time out
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "head_dim" in e.value.details()
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


def test_send_without_bootstrap_times_out_and_unpins(two_kvds):
    (_, sock_a, _), (_, _, addr_b) = two_kvds

    async def run():
        a = _client(sock_a)
        pa, _ = await _attach(a, "lonely-p")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await a.SendKv(
                kvd_pb2.SendKvRequest(
                    pool_id=pa.pool_id, room="lonely", page_ids=[1, 2], peer_address=addr_b
                )
            )
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _pinned(a) == 0

    asyncio.run(run())


def test_prefill_kvd_killed_fails_waiting_room_within_heartbeats(tmp_path):
    (proc_a, _, addr_a), (proc_b, sock_b, _) = _start_pair(tmp_path, "nixl")

    async def run():
        b = _client(sock_b)
        pb, _ = await _attach(b, "killed-d")
        expect = asyncio.ensure_future(
            b.ExpectKv(
                kvd_pb2.ExpectKvRequest(
                    pool_id=pb.pool_id,
                    room="r",
                    page_ids=[1, 2],
                    peer_address=addr_a,
                    timeout_seconds=30,
                )
            )
        )
        await asyncio.sleep(0.3)
        proc_a.kill()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "heartbeats" in e.value.details()
        assert loop.time() - start < 3.0  # interval 0.3 x 2 failures, plus slack
        assert await _pinned(b) == 0

    try:
        asyncio.run(run())
    finally:
        stop(proc_a)
        assert stop(proc_b) == 0


def test_a_prefill_kvd_restarted_at_its_address_is_reached_at_once(tmp_path):
    """The decode kvd's channel to a dead prefill kvd backs off between reconnects. Once a kvd
    is back at that address, the next room must reach it at once — a fresh channel must not
    inherit the dead one's backoff (gRPC shares subchannels between channels by default)."""
    (proc_a, _, addr_a), (proc_b, sock_b, _) = _start_pair(tmp_path, "nixl")
    restarted = None

    async def run():
        nonlocal restarted
        b = _client(sock_b)
        pb, _ = await _attach(b, "restart-d")
        expect = asyncio.ensure_future(b.ExpectKv(kvd_pb2.ExpectKvRequest(
            pool_id=pb.pool_id, room="before", page_ids=[1, 2], peer_address=addr_a,
            timeout_seconds=30)))
        await asyncio.sleep(0.3)
        proc_a.kill()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect
        assert "heartbeats" in e.value.details()
        await asyncio.sleep(2.0)  # the dead channel's reconnect backoff has grown by now
        restarted = start_kvd_at(tmp_path, "a2", int(addr_a.rsplit(":", 1)[1]), "nixl",
                                 env=SHORT)
        a2 = _client(restarted[1])
        expect = asyncio.ensure_future(b.ExpectKv(kvd_pb2.ExpectKvRequest(
            pool_id=pb.pool_id, room="after", page_ids=[1, 2], peer_address=addr_a,
            timeout_seconds=30)))
        await a2.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(room="after", timeout_seconds=5),
                                timeout=10)
        assert not expect.done()  # bootstrapped, waiting for its KV
        await b.ReleaseRoom(kvd_pb2.ReleaseRoomRequest(room="after"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await expect
        assert e.value.code() == grpc.StatusCode.CANCELLED
        assert await _pinned(b) == 0

    try:
        asyncio.run(run())
    finally:
        stop(proc_a)
        if restarted is not None:
            assert stop(restarted[0]) == 0
        assert stop(proc_b) == 0


def test_abandoned_room_is_cancelled_at_the_prefill_kvd_before_its_pages_go(two_kvds):
    """Once bootstrapped, the prefill side may write at any time. A room the decode worker
    abandons is cancelled at the prefill kvd (CancelRoom) before its pages are unpinned, so a
    late SendKv is refused there instead of writing into pages given to another request."""
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, "late-p"), await _attach(b, "late-d")
        sent_before = (await a.Stats(kvd_pb2.StatsRequest())).bytes_sent
        expect = asyncio.ensure_future(b.ExpectKv(kvd_pb2.ExpectKvRequest(
            pool_id=pb.pool_id, room="late", page_ids=[4, 5], peer_address=addr_a)))
        await asyncio.sleep(0.5)  # bootstrapped
        expect.cancel()  # the decode worker's client went away
        await b.ReleaseRoom(kvd_pb2.ReleaseRoomRequest(room="late"), timeout=5)
        assert await _pinned(b) == 0  # released at once: the prefill kvd confirmed the cancel
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await a.SendKv(kvd_pb2.SendKvRequest(pool_id=pa.pool_id, room="late",
                                                 page_ids=[1, 2], peer_address=addr_b))
        assert e.value.code() == grpc.StatusCode.ABORTED and "late" in e.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await a.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(room="late"))
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert await _pinned(a) == 0 and await _pinned(b) == 0
        assert (await a.Stats(kvd_pb2.StatsRequest())).bytes_sent == sent_before  # no write

    asyncio.run(run())


def test_await_bootstrap_returns_once_the_decode_side_reserved(two_kvds):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        a, b = _client(sock_a), _client(sock_b)
        (pa, _), (pb, _) = await _attach(a, "ab-p"), await _attach(b, "ab-d")
        waiting = asyncio.ensure_future(a.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(
            room="ab")))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # no destination yet: the prefill side must not compute
        expect = asyncio.ensure_future(b.ExpectKv(kvd_pb2.ExpectKvRequest(
            pool_id=pb.pool_id, room="ab", page_ids=[7, 8, 9], peer_address=addr_a)))
        assert (await asyncio.wait_for(waiting, 5)).num_pages == 3
        await a.SendKv(kvd_pb2.SendKvRequest(pool_id=pa.pool_id, room="ab", page_ids=[1, 2, 3],
                                             peer_address=addr_b))
        await expect
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await a.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(room="never",
                                                                 timeout_seconds=0.2))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _pinned(a) == 0 and await _pinned(b) == 0

    asyncio.run(run())


def test_peer_surface_refuses_strangers_unknown_rooms_and_foreign_pages(two_kvds):
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds

    async def run():
        b = _client(sock_b)
        (pb, vb) = await _attach(b, "peer-d")
        async with grpc.aio.insecure_channel(addr_b) as ch:
            peer = kvd_pb2_grpc.KvdPeerServiceStub(ch)
            cases = [
                # another backend cannot handshake
                (peer.Handshake(kvd_pb2.HandshakeRequest(kvd_id="x", backend="mooncake",
                                                         peer_address="127.0.0.1:1")),
                 "FAILED_PRECONDITION"),
                # a kvd that never handshook cannot bootstrap
                (peer.Bootstrap(kvd_pb2.BootstrapRequest(room="r", kvd_id="stranger",
                                                         layout=LAYOUT, page_ids=[1])),
                 "FAILED_PRECONDITION"),
                # nobody expects this room here
                (peer.TransferDone(kvd_pb2.TransferDoneRequest(room="nope", kvd_id="x")),
                 "NOT_FOUND"),
            ]
            for call, code in cases:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call
                assert e.value.code().name == code, e.value.details()
            # a room expected from kvd a cannot be completed by anyone else
            expect = asyncio.ensure_future(b.ExpectKv(kvd_pb2.ExpectKvRequest(
                pool_id=pb.pool_id, room="owned", page_ids=[3], peer_address=addr_a,
                timeout_seconds=1)))
            await asyncio.sleep(0.5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await peer.TransferDone(kvd_pb2.TransferDoneRequest(room="owned",
                                                                    kvd_id="impostor"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # pages bound to one room cannot be granted to another
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await b.ExpectKv(kvd_pb2.ExpectKvRequest(
                    pool_id=pb.pool_id, room="thief", page_ids=[3], peer_address=addr_a))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError):
                await expect
        assert not vb.any()  # nothing was written
        assert await _unpinned(b)  # the bootstrapped room drains (waiting timeout 2 s in SHORT)

    asyncio.run(run())


_IMPOSTOR = """
import os, sys
from services.kvd.backends.nixl_backend import NixlBackend
backend = NixlBackend()
print("metadata", backend.metadata().hex(), flush=True)
peer = backend.connect(bytes.fromhex(sys.stdin.readline()))
for line in sys.stdin:
    backend.notify(peer, bytes.fromhex(line))
    print("sent", "ok", flush=True)
os._exit(0)  # UCX segfaults at a normal exit (DESIGN.md)
"""


def test_a_transfer_done_notification_counts_only_from_the_rooms_prefill_kvd(two_kvds, tmp_path):
    """Another NIXL agent that handshook with the decode kvd cannot complete a room expected
    from kvd a by notification, even naming a's kvd id — nor set the ready flag of one whose
    worker was answered early; garbage is dropped. Both are logged."""
    (_, sock_a, addr_a), (_, sock_b, addr_b) = two_kvds
    impostor = subprocess.Popen([sys.executable, "-c", _IMPOSTOR], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env={
                                    **os.environ, "UCX_MODULES": "^ib"})

    def said(what: str) -> str:
        """The impostor's next line about `what` (NIXL prints lines of its own)."""
        while line := impostor.stdout.readline():
            if line.startswith(what + " "):
                return line.split()[1]
        raise AssertionError(f"the impostor ended before saying {what}")

    def say(line: str) -> None:
        impostor.stdin.write(line + "\n")
        impostor.stdin.flush()

    async def run():
        b = _client(sock_b)
        (pb, vb) = await _attach(b, "forged-d")
        async with grpc.aio.insecure_channel(addr_b) as ch_b, \
                grpc.aio.insecure_channel(addr_a) as ch_a:
            a_id = (await kvd_pb2_grpc.KvdPeerServiceStub(ch_a).Heartbeat(
                kvd_pb2.HeartbeatRequest(kvd_id="test"))).kvd_id
            metadata = bytes.fromhex(said("metadata"))
            reply = await kvd_pb2_grpc.KvdPeerServiceStub(ch_b).Handshake(
                kvd_pb2.HandshakeRequest(kvd_id="impostor", backend="nixl",
                                         backend_metadata=metadata,
                                         peer_address="127.0.0.1:1"))
            say(reply.backend_metadata.hex())
            expect = asyncio.ensure_future(b.ExpectKv(kvd_pb2.ExpectKvRequest(
                pool_id=pb.pool_id, room="forged", page_ids=[4], peer_address=addr_a,
                timeout_seconds=1.5)))
            await asyncio.sleep(0.5)  # bootstrapped with kvd a: the listener polls
            # a room answered early with a ready flag (a's in-flight report, in a's name)
            early = asyncio.ensure_future(b.ExpectKv(kvd_pb2.ExpectKvRequest(
                pool_id=pb.pool_id, room="forged-flag", page_ids=[5], peer_address=addr_a,
                accept_ready_flag=True)))
            await asyncio.sleep(0.5)
            await kvd_pb2_grpc.KvdPeerServiceStub(ch_b).TransferDone(kvd_pb2.TransferDoneRequest(
                room="forged-flag", kvd_id=a_id, in_flight=True,
                aux=kvd_pb2.RoomAux(first_token_id=1)))
            got = await asyncio.wait_for(early, 5)
            landing = map_ready_flags(pb, LAYOUT.num_pages).landing(got.ready_flag.index,
                                                                    got.ready_flag.ticket)
            for room in ("forged", "forged-flag"):
                forged = kvd_pb2.TransferDoneRequest(room=room, kvd_id=a_id, kv_bytes=1,
                                                     aux=kvd_pb2.RoomAux(first_token_id=1))
                say((notifications.PREFIX + forged.SerializeToString()).hex())
            say(b"garbage".hex())
            assert said("sent") == said("sent") == said("sent") == "ok"
            await asyncio.sleep(0.3)  # the listener polls every 25-500 us
            assert landing.poll() is LandingState.PENDING  # the forged landing set nothing
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await expect
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # not completed
            deadline = time.monotonic() + 10  # the waiting timeout (2 s) fails the flag room
            while landing.poll() is LandingState.PENDING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert landing.poll() is LandingState.FAILED
        assert await _unpinned(b)

    try:
        asyncio.run(run())
    finally:
        impostor.kill()
        impostor.wait()
    log = (Path(sock_b).parent / "b.log").read_text()
    assert "dropped a TransferDone notification for room forged" in log
    assert "dropped a notification from" in log


@pytest.mark.parametrize("surface, method", [
    ("local", "/tandem.v1.KvdService/ExpectKv"),
    ("local", "/tandem.v1.KvdService/SendKv"),
    ("peer", "/tandem.v1.KvdPeerService/Bootstrap"),
    ("peer", "/tandem.v1.KvdPeerService/TransferDone"),
])
def test_bytes_that_do_not_parse_are_invalid_argument(two_kvds, surface, method):
    (_, sock_a, addr_a), _ = two_kvds
    target = f"unix:{sock_a}" if surface == "local" else addr_a

    async def run():
        async with grpc.aio.insecure_channel(target) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ch.unary_unary(method)(b"\xff\xff\xff not a protobuf", timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in e.value.details()
        assert await _pinned(_client(sock_a)) == 0

    asyncio.run(run())


def test_a_killed_kvds_segments_are_removed_by_the_next_kvd(tmp_path):
    """SIGKILL leaves /dev/shm segments behind (RAM until reboot); the next kvd on the machine
    unlinks those whose owner is gone, and only those."""
    proc, sock, _ = start_kvd(tmp_path, "doomed", "nixl")
    live, live_sock, _ = start_kvd(tmp_path, "alive", "nixl")
    try:
        async def attach_both():
            doomed, _ = await _attach(_client(sock), "orphan")
            kept, _ = await _attach(_client(live_sock), "kept")
            return doomed.segment_name, kept.segment_name

        orphan, kept = asyncio.run(attach_both())
        proc.kill()
        proc.wait(10)
        assert (SHM_DIR / orphan).exists()
        successor, successor_sock, _ = start_kvd(tmp_path, "successor", "nixl")
        try:
            assert not (SHM_DIR / orphan).exists()
            assert (SHM_DIR / kept).exists()  # its kvd lives

            async def kept_pool_serves() -> bool:  # the live kvd's pool is untouched
                stats = await _client(live_sock).Stats(kvd_pb2.StatsRequest())
                return [p.worker_id for p in stats.pools] == ["kept"]

            assert asyncio.run(kept_pool_serves())
        finally:
            assert stop(successor) == 0
    finally:
        stop(proc)
        assert stop(live) == 0
    assert not (SHM_DIR / kept).exists()  # a kvd that stops unlinks its own
