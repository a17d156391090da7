"""kvd-owned VRAM pools on real GPUs: CUDA IPC to worker processes, re-attach, transfers
between GPUs (same-node peer copies, NIXL and Mooncake between two kvds), and the life cycle
(a killed worker leaves kvd serving; a stopped or killed kvd gives its GPU memory back)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common.kvd_client import gpu_placement
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.common.vram import IpcMapping
from tests.kvd.vram_layout import PAGE_BYTES, kv_layout_proto, pattern
from tests.procs import kill, start, start_kvd, stop, wait_healthy

pytestmark = pytest.mark.gpu
MIB = 1 << 20
SLACK = 64 * MIB  # GPU memory a fresh process may see move between two readings


@pytest.fixture(autouse=True)
def _gpus():
    """Two GPUs, and CUDA initialized in this process before any memory baseline."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    for gpu in (0, 1):
        torch.zeros(1, device=f"cuda:{gpu}")
    torch.cuda.synchronize()


def _stub(sock: str) -> kvd_pb2_grpc.KvdServiceStub:
    return kvd_pb2_grpc.KvdServiceStub(grpc.insecure_channel(f"unix:{sock}"))


def _attach(stub, worker: str, gpu: int, num_pages: int,
            placement: kvd_pb2.KvPlacement | None = None) -> kvd_pb2.AttachPoolResponse:
    return stub.AttachPool(kvd_pb2.AttachPoolRequest(
        worker_id=worker, layout=kv_layout_proto(num_pages),
        placement=placement or gpu_placement(gpu)), timeout=120)


def _open(reply: kvd_pb2.AttachPoolResponse, gpu: int):
    import torch

    mapping = IpcMapping.open(gpu, reply.cuda_ipc_handle, reply.total_bytes)
    return mapping, torch.as_tensor(mapping, device=f"cuda:{gpu}")  # [total_bytes] uint8


def _free_bytes(gpu: int) -> int:
    """Free memory of `gpu` as a fresh process sees it."""
    out = subprocess.run([sys.executable, "-c", "import torch, sys; "
                          f"print(torch.cuda.mem_get_info({gpu})[0])"],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


def _worker(tmp: Path, sock: str, worker: str, gpu: int, num_pages: int, seed: int,
            then: str) -> tuple[subprocess.Popen, str, bytes]:
    """Run tests/kvd/vram_worker.py until it has filled its pool: (process, pool id, handle)."""
    ready = tmp / f"{worker}-{seed}.ready"
    proc = start(["-m", "tests.kvd.vram_worker", sock, worker, str(gpu), str(num_pages),
                  str(seed), str(ready), then], tmp / f"{worker}-{seed}.log")
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, (tmp / f"{worker}-{seed}.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the worker did not fill its pool in 120 s"
        time.sleep(0.1)
    if then == "exit":
        assert proc.wait(60) == 0, (tmp / f"{worker}-{seed}.log").read_text()[-2000:]
    pool_id, handle, *event = ready.read_text().split()
    if then == "forward":
        return proc, pool_id, bytes.fromhex(event[0])  # the event's handle, not the pool's
    return proc, pool_id, bytes.fromhex(handle)


def _wait_free(gpu: int, at_least: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        free = _free_bytes(gpu)
        if free >= at_least or time.monotonic() > deadline:
            return free
        time.sleep(1.0)


def test_worker_fills_vram_pool_by_ipc_and_reattach_opens_the_same_memory(tmp_path):
    import torch

    baseline = _free_bytes(0)
    proc, sock, _ = start_kvd(tmp_path, "k", "nixl")
    try:
        _, pool_id, handle = _worker(tmp_path, sock, "prefill-1", 0, 64, seed=1, then="exit")
        stub = _stub(sock)
        reply = _attach(stub, "prefill-1", 0, 64)
        assert (reply.reattached, reply.pool_id, reply.cuda_ipc_handle) == (True, pool_id, handle)
        assert (reply.segment_name, reply.kvd_gpu_index, reply.total_bytes) == ("", 0,
                                                                                64 * PAGE_BYTES)
        mapping, view = _open(reply, 0)
        assert torch.equal(view, pattern(64 * PAGE_BYTES, 1, view.device))  # what the worker wrote
        del view
        mapping.close()
        torch.cuda.empty_cache()  # this process's cached blocks would count as kvd's below
        with pytest.raises(grpc.RpcError) as moved:
            _attach(stub, "prefill-1", 1, 64)
        assert moved.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "re-attached on GPU 1" in moved.value.details()
        absent = kvd_pb2.KvPlacement(gpu_index=7, gpu_uuid=b"\xff" * 16)
        with pytest.raises(grpc.RpcError) as missing:
            _attach(stub, "decode-9", 7, 64, absent)
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not visible to kvd" in missing.value.details()
        stats = stub.Stats(kvd_pb2.StatsRequest(), timeout=10)
        assert [(p.worker_id, p.num_pages) for p in stats.pools] == [("prefill-1", 64)]
    finally:
        assert stop(proc) == 0  # SIGTERM: backends closed, then cudaFree
    assert _wait_free(0, baseline - SLACK) >= baseline - SLACK


def test_killed_worker_leaves_kvd_serving_and_killed_kvd_frees_its_vram(tmp_path):
    import torch

    num_pages = 1 << 16  # 1 GiB
    baseline = _free_bytes(1)
    proc, sock, _ = start_kvd(tmp_path, "k", "nixl")
    try:
        worker, pool_id, _ = _worker(tmp_path, sock, "decode-1", 1, num_pages, seed=2,
                                     then="wait")
        kill(worker)
        wait_healthy(f"unix:{sock}", proc, timeout=10)
        stub = _stub(sock)
        reply = _attach(stub, "decode-1", 1, num_pages)
        assert reply.reattached and reply.pool_id == pool_id
        mapping, view = _open(reply, 1)
        assert torch.equal(view, pattern(num_pages * PAGE_BYTES, 2, view.device))
        del view
        mapping.close()
        torch.cuda.empty_cache()  # this process's cached blocks would count as kvd's below
        in_use = _free_bytes(1)
        assert baseline - in_use >= num_pages * PAGE_BYTES
    finally:
        kill(proc)
    assert _wait_free(1, baseline - SLACK) >= baseline - SLACK


def _assert_nothing_pinned(*stubs) -> None:
    for stub in stubs:
        stats = stub.Stats(kvd_pb2.StatsRequest(), timeout=10)
        assert all(p.pinned_pages == 0 for p in stats.pools)


def _await_nothing_pinned(*stubs, timeout: float, why: str, poll: float) -> None:
    """`_assert_nothing_pinned` once it holds, failing with `why` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _assert_nothing_pinned(*stubs)
            return
        except AssertionError:
            assert time.monotonic() < deadline, why
            time.sleep(poll)


@contextmanager
def _kvds(tmp: Path, backend: str = "nixl", two: bool = False) -> Iterator[tuple[tuple, tuple]]:
    """kvd `a` and kvd `b` — the same kvd (the local path) unless `two`: each
    (process, socket, peer address). Stopped on the way out, each must exit with 0."""
    kvds = [start_kvd(tmp, "a", backend)]
    try:
        if two:
            kvds.append(start_kvd(tmp, "b", backend))
        yield kvds[0], kvds[-1]
    finally:
        codes = [stop(proc) for proc, _, _ in kvds]
    assert codes == [0] * len(codes)


@dataclass
class _Pools:
    """A prefill pool attached to kvd `a` and a decode pool attached to kvd `b` (maybe the
    same kvd), both mapped in this process."""

    a: kvd_pb2_grpc.KvdServiceStub
    b: kvd_pb2_grpc.KvdServiceStub
    addr_a: str
    addr_b: str
    src_reply: kvd_pb2.AttachPoolResponse
    dst_reply: kvd_pb2.AttachPoolResponse
    src: Any  # torch.Tensor [num_pages * PAGE_BYTES] uint8 on the prefill pool's GPU
    dst: Any  # torch.Tensor [num_pages * PAGE_BYTES] uint8 on the decode pool's GPU
    num_pages: int

    @property
    def src_pages(self) -> Any:
        return self.src.view(self.num_pages, PAGE_BYTES)  # [num_pages, PAGE_BYTES]

    @property
    def dst_pages(self) -> Any:
        return self.dst.view(self.num_pages, PAGE_BYTES)  # [num_pages, PAGE_BYTES]

    def room(self, name: str, first: int, moved: int, accept_ready_flag: bool = False
             ) -> tuple[grpc.Future, grpc.Future]:
        """ExpectKv (accepting a ready event, and a ready flag if `accept_ready_flag`) then
        SendKv of src pages [first, first + moved) into dst pages [0, moved): (ExpectKv
        future, SendKv future)."""
        expect = self.b.ExpectKv.future(kvd_pb2.ExpectKvRequest(
            pool_id=self.dst_reply.pool_id, room=name, page_ids=list(range(moved)),
            peer_address=self.addr_a, timeout_seconds=30, accept_ready_event=True,
            accept_ready_flag=accept_ready_flag), timeout=60)
        send = self.a.SendKv.future(kvd_pb2.SendKvRequest(
            pool_id=self.src_reply.pool_id, room=name, page_ids=list(range(first, first + moved)),
            peer_address=self.addr_b, aux=kvd_pb2.RoomAux(first_token_id=3), timeout_seconds=30),
            timeout=60)
        return expect, send


@contextmanager
def _mapped_pools(kvd_a: tuple, kvd_b: tuple, tag: str, num_pages: int, src_gpu: int = 0,
                  dst_gpu: int = 1) -> Iterator[_Pools]:
    """Pool `prefill-{tag}` on `src_gpu` attached to `kvd_a` and `decode-{tag}` on `dst_gpu`
    attached to `kvd_b`, mapped here until the way out."""
    (_, sock_a, addr_a), (_, sock_b, addr_b) = kvd_a, kvd_b
    a = _stub(sock_a)
    b = a if sock_b == sock_a else _stub(sock_b)  # one kvd: one channel to it
    src_reply = _attach(a, f"prefill-{tag}", src_gpu, num_pages)
    dst_reply = _attach(b, f"decode-{tag}", dst_gpu, num_pages)
    (src_map, src), (dst_map, dst) = _open(src_reply, src_gpu), _open(dst_reply, dst_gpu)
    pools = _Pools(a, b, addr_a, addr_b, src_reply, dst_reply, src, dst, num_pages)
    del src, dst
    try:
        yield pools
    finally:
        pools.src = pools.dst = None  # the pools' own tensors go before their mappings
        src_map.close()
        dst_map.close()


@contextmanager
def _gpu_pools(tmp: Path, tag: str, num_pages: int, backend: str = "nixl",
               two_kvds: bool = False) -> Iterator[_Pools]:
    """`_kvds` with `_mapped_pools` of `tag` on GPU 0 (kvd `a`) and GPU 1 (kvd `b`)."""
    with _kvds(tmp, backend, two_kvds) as (kvd_a, kvd_b), \
            _mapped_pools(kvd_a, kvd_b, tag, num_pages) as pools:
        yield pools


def _move(send: tuple, recv: tuple, src_gpu: int, dst_gpu: int, room: str) -> str:
    """Fill a pool on `src_gpu` (kvd `send`), move four coalesced runs of it into a pool on
    `dst_gpu` (kvd `recv`; the same kvd: the local path), check every byte; the backend."""
    import torch

    with _mapped_pools(send, recv, room, 64, src_gpu, dst_gpu) as pools:
        pools.src.copy_(pattern(pools.src.numel(), 5, pools.src.device))
        torch.cuda.synchronize(src_gpu)
        src_pages = [3, 4, 5, 10, 11, 20, 40, 41, 42, 43]
        dst_pages = [7, 8, 9, 30, 31, 0, 50, 51, 52, 53]  # runs: 3 + 2 + 1 + 4 pages
        expect = pools.b.ExpectKv.future(kvd_pb2.ExpectKvRequest(
            pool_id=pools.dst_reply.pool_id, room=room, page_ids=dst_pages,
            peer_address=pools.addr_a, timeout_seconds=30), timeout=60)
        sent = pools.a.SendKv(kvd_pb2.SendKvRequest(
            pool_id=pools.src_reply.pool_id, room=room, page_ids=src_pages,
            peer_address=pools.addr_b, aux=kvd_pb2.RoomAux(first_token_id=11),
            timeout_seconds=30), timeout=60)
        got = expect.result(timeout=60)
        assert (sent.kv_bytes, sent.num_descriptors) == (10 * PAGE_BYTES, 4)
        assert (got.kv_bytes, got.aux.first_token_id) == (sent.kv_bytes, 11)
        assert got.ready_event == b""  # not accepted: answered once the bytes are there
        src_pages_t = pools.src_pages.cpu()
        dst_pages_t = pools.dst_pages.cpu()
        for s, d in zip(src_pages, dst_pages, strict=True):
            assert torch.equal(dst_pages_t[d], src_pages_t[s]), f"page {s} -> {d} differs"
        untouched = sorted(set(range(64)) - set(dst_pages))
        assert not dst_pages_t[untouched].any()  # a fresh pool is zeroed; nothing else written
        _assert_nothing_pinned(pools.a, pools.b)
        return sent.backend


def test_local_path_moves_coalesced_runs_between_gpus(tmp_path):
    with _kvds(tmp_path) as (kvd, _):
        assert _move(kvd, kvd, 0, 1, "room-0to1") == "local"
        assert _move(kvd, kvd, 1, 0, "room-1to0") == "local"


def test_ready_event_orders_reads_after_the_queued_copy_and_pages_wait_for_it(tmp_path):
    """A decode worker that accepts a ready event: kvd answers with an IPC event once the
    GPU 0 -> GPU 1 copy is queued. A read ordered after the event sees every byte; a new room
    on the same pages issued right after an answer is taken (kvd waits for the copy still
    landing there instead of refusing the pages); SendKv answers after its copy; nothing
    stays pinned."""
    import torch

    num_pages, moved = 1 << 15, 1 << 14  # 512 MiB pools; 256 MiB per room (~0.7 ms)
    with _gpu_pools(tmp_path, "ev", num_pages) as pools:
        src_pages, dst_pages = pools.src_pages, pools.dst_pages

        def landed(name: str, got: kvd_pb2.ExpectKvResponse, first: int) -> bool:
            """Whether a read on a stream of GPU 1 ordered after the ready event sees the
            room's bytes."""
            assert len(got.ready_event) == 64 and got.kv_bytes == moved * PAGE_BYTES, name
            ready = torch.cuda.Event.from_ipc_handle(1, got.ready_event)
            side = torch.cuda.Stream(1)
            with torch.cuda.stream(side):
                side.wait_event(ready)
                return torch.equal(dst_pages[:moved], src_pages[first:first + moved].to(1))

        pools.src.copy_(pattern(pools.src.numel(), 6, pools.src.device))
        torch.cuda.synchronize(0)
        expect, send = pools.room("ev-1", 0, moved)
        assert landed("ev-1", expect.result(timeout=60), 0), "a read saw bytes not yet there"
        assert send.result(timeout=60).backend == "local"
        expect2, send2 = pools.room("ev-2", moved, moved)
        got2 = expect2.result(timeout=60)
        expect3, send3 = pools.room("ev-3", 0, moved)  # ev-2's copy may still be landing there
        assert len(got2.ready_event) == 64
        assert landed("ev-3", expect3.result(timeout=60), 0)
        for sent in (send2.result(timeout=60), send3.result(timeout=60)):
            assert sent.backend == "local" and sent.kv_bytes == moved * PAGE_BYTES
        _assert_nothing_pinned(pools.a)


def test_ready_flag_says_landed_once_a_same_node_copy_is_done(tmp_path):
    """A decode worker that accepts a ready flag (and an event): kvd answers a same-node room
    with the flag, not the event, once the copy is queued; the flag says landed only when
    every byte is there (read with no GPU ordering at all, as the worker's engine reads after
    the flag); a new room on those pages right after waits for the first to settle; nothing
    stays pinned."""
    import torch

    from services.common.kvd_client import map_ready_flags
    from services.common.ready_flags import LandingState

    num_pages, moved = 1 << 15, 1 << 14  # 512 MiB pools; 256 MiB per room (~0.7 ms)
    with _gpu_pools(tmp_path, "fl", num_pages) as pools:
        flags = map_ready_flags(pools.dst_reply, num_pages)
        src_pages, dst_pages = pools.src_pages, pools.dst_pages

        def landed(got: kvd_pb2.ExpectKvResponse, first: int) -> bool:
            assert got.HasField("ready_flag") and not got.ready_event
            assert got.aux.first_token_id == 3 and got.kv_bytes == moved * PAGE_BYTES
            landing = flags.landing(got.ready_flag.index, got.ready_flag.ticket)
            deadline = time.monotonic() + 30
            while landing.poll() is LandingState.PENDING and time.monotonic() < deadline:
                time.sleep(20e-6)
            assert landing.poll() is LandingState.LANDED
            side = torch.cuda.Stream(1)  # no wait on anything kvd did
            with torch.cuda.stream(side):
                return torch.equal(dst_pages[:moved], src_pages[first:first + moved].to(1))

        pools.src.copy_(pattern(pools.src.numel(), 7, pools.src.device))
        torch.cuda.synchronize(0)
        pools.dst.zero_()
        torch.cuda.synchronize(1)
        expect, send = pools.room("fl-1", 0, moved, accept_ready_flag=True)
        assert landed(expect.result(timeout=60), 0), "the flag said landed before the bytes"
        assert send.result(timeout=60).backend == "local"
        expect2, send2 = pools.room("fl-2", moved, moved, accept_ready_flag=True)
        got2 = expect2.result(timeout=60)
        # fl-2 may still hold these pages
        expect3, send3 = pools.room("fl-3", 0, moved, accept_ready_flag=True)
        assert landed(got2, moved)
        assert landed(expect3.result(timeout=60), 0)
        for sent in (send2.result(timeout=60), send3.result(timeout=60)):
            assert sent.backend == "local" and sent.kv_bytes == moved * PAGE_BYTES
        _await_nothing_pinned(pools.a, timeout=10, why="rooms settled", poll=0.05)


@pytest.mark.parametrize("path", ["local_ready_event", "local", "nixl", "mooncake"])
def test_source_ready_event_orders_kvd_reads_after_the_prefill_stream(tmp_path, path):
    """SendKvAhead before the prefill's GPU work is done: this process plays the prefill
    worker — on a stream of GPU 0 it sleeps ~0.3 s, then writes the pages and records an IPC
    event, and sends the room with that event at once. Every path must read the pages after
    the event: the decode side sees the written bytes. A control room sent the same way
    without the event is read before the write (the check can fail); transfer_seconds counts
    the copy, not the wait."""
    import torch

    num_pages, moved = 64, [3, 4, 5, 9]
    backend = "mooncake" if path == "mooncake" else "nixl"
    with _gpu_pools(tmp_path, f"src-{path}", num_pages, backend,
                    two_kvds=not path.startswith("local")) as pools:
        device = pools.src.device
        written = pattern(len(moved) * PAGE_BYTES, 8, device).view(len(moved), PAGE_BYTES)
        index = torch.tensor(moved, device=device)
        prefill = torch.cuda.Stream(0)
        timing = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        with torch.cuda.stream(prefill):  # _sleep counts GPU clock cycles: how many in a second
            torch.cuda._sleep(1_000_000)
            timing[0].record(prefill)
            torch.cuda._sleep(20_000_000)
            timing[1].record(prefill)
        prefill.synchronize()
        cycles_per_second = 20_000_000 / (timing[0].elapsed_time(timing[1]) / 1e3)

        def room(name: str, with_event: bool) -> tuple[torch.Tensor, kvd_pb2.SendKvResponse]:
            pools.src.zero_()
            pools.dst.zero_()
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            expect = pools.b.ExpectKv.future(kvd_pb2.ExpectKvRequest(
                pool_id=pools.dst_reply.pool_id, room=name, page_ids=list(range(len(moved))),
                peer_address=pools.addr_a, timeout_seconds=30,
                accept_ready_event=path == "local_ready_event"), timeout=60)
            event = torch.cuda.Event(interprocess=True)
            with torch.cuda.stream(prefill):  # nothing here may wait on the host
                torch.cuda._sleep(int(0.3 * cycles_per_second))  # ~0.3 s of "forward"
                pools.src_pages.index_copy_(0, index, written)
                event.record(prefill)
            request = kvd_pb2.SendKvRequest(
                pool_id=pools.src_reply.pool_id, room=name, page_ids=moved,
                peer_address=pools.addr_b, timeout_seconds=30,
                source_ready_event=bytes(event.ipc_handle()) if with_event else b"")
            sent = pools.a.SendKvAhead(iter([
                kvd_pb2.SendKvPart(request=request),
                kvd_pb2.SendKvPart(aux=kvd_pb2.RoomAux(first_token_id=5))]), timeout=60)
            got = expect.result(timeout=60)
            assert got.aux.first_token_id == 5 and got.kv_bytes == len(moved) * PAGE_BYTES
            assert bool(got.ready_event) == (path == "local_ready_event")
            if got.ready_event:
                torch.cuda.Event.from_ipc_handle(1, got.ready_event).synchronize()
            prefill.synchronize()
            return pools.dst_pages[:len(moved)].to(0), sent

        landed, sent = room(f"src-ev-{path}", True)
        assert torch.equal(landed, written), "kvd read the pages before the prefill wrote them"
        assert sent.backend == (backend if not path.startswith("local") else "local")
        assert sent.transfer_seconds < 0.1  # the copy alone, not the 0.3 s wait
        landed, _ = room(f"src-none-{path}", False)
        assert not torch.equal(landed, written)  # the control: read at once, before the write
        _assert_nothing_pinned(pools.a, pools.b)


def test_many_rooms_sent_ahead_behind_one_event_are_all_read_after_it(tmp_path):
    """A batched prefill announces 16 rooms at once with one forward pass's event: kvd's polling
    thread queues each room's copy (same node, ready events) once the event completes. Every
    room must carry the bytes written just before the event, and nothing may stay pinned."""
    import torch

    rooms, per_room, num_pages = 16, 2, 64
    with _gpu_pools(tmp_path, "batch", num_pages) as pools:
        stub, addr = pools.a, pools.addr_a  # one kvd: both sides
        src_pages, dst_pages = pools.src_pages, pools.dst_pages
        pools.src.zero_()
        pools.dst.zero_()
        moved = rooms * per_room
        written = pattern(moved * PAGE_BYTES, 11, pools.src.device).view(moved, PAGE_BYTES)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        expects = [stub.ExpectKv.future(kvd_pb2.ExpectKvRequest(
            pool_id=pools.dst_reply.pool_id, room=f"batch-{i}",
            page_ids=list(range(32 + i * per_room, 32 + (i + 1) * per_room)),
            peer_address=addr, timeout_seconds=30, accept_ready_event=True), timeout=60)
            for i in range(rooms)]
        for i in range(rooms):
            stub.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(room=f"batch-{i}",
                                                              timeout_seconds=30), timeout=40)
        prefill, event = torch.cuda.Stream(0), torch.cuda.Event(interprocess=True)
        with torch.cuda.stream(prefill):
            torch.cuda._sleep(200_000_000)  # ~0.1 s or more at H100 clocks
            src_pages[:moved].copy_(written)
            event.record(prefill)
        handle = bytes(event.ipc_handle())
        sends = [stub.SendKvAhead.future(iter([
            kvd_pb2.SendKvPart(request=kvd_pb2.SendKvRequest(
                pool_id=pools.src_reply.pool_id, room=f"batch-{i}",
                page_ids=list(range(i * per_room, (i + 1) * per_room)), peer_address=addr,
                timeout_seconds=30, source_ready_event=handle)),
            kvd_pb2.SendKvPart(aux=kvd_pb2.RoomAux(first_token_id=i))]), timeout=60)
            for i in range(rooms)]
        for i, (expect, send) in enumerate(zip(expects, sends, strict=True)):
            got = expect.result(timeout=60)
            assert got.aux.first_token_id == i and got.ready_event
            torch.cuda.Event.from_ipc_handle(1, got.ready_event).synchronize()
            assert send.result(timeout=60).backend == "local"
        landed = dst_pages[32:32 + moved].to(0)
        assert torch.equal(landed, written), "a room was read before the prefill wrote it"
        # the decode side's pages unpin as their copies land
        _await_nothing_pinned(stub, timeout=10, why="pages stayed pinned", poll=0.1)


@pytest.mark.parametrize("path", ["local_ready_event", "nixl"])
def test_a_prefill_killed_mid_forward_after_sending_ahead_wedges_nothing(tmp_path, path):
    """A prefill worker announces a room with its forward pass's event, then dies before the
    pass ends (its call to kvd goes with it). kvd must not stay stuck behind that event: the
    room fails, nothing stays pinned, and the next room from the same GPU moves at once."""
    with _kvds(tmp_path, two=path == "nixl") as ((_, sock_a, addr_a), (_, sock_b, addr_b)):
        a, b = _stub(sock_a), _stub(sock_b)
        worker, pool_id, event = _worker(tmp_path, sock_a, "prefill-dies", 0, 64, 3, "forward")
        dst_reply = _attach(b, f"decode-dies-{path}", 1, 64)
        ahead = path == "local_ready_event"

        def expect(room: str) -> grpc.Future:
            return b.ExpectKv.future(kvd_pb2.ExpectKvRequest(
                pool_id=dst_reply.pool_id, room=room, page_ids=[1, 2], peer_address=addr_a,
                timeout_seconds=30, accept_ready_event=ahead), timeout=60)

        try:
            doomed = expect("doomed")
            first_token: list[kvd_pb2.SendKvPart] = []  # never sent: the worker dies first

            def parts():
                yield kvd_pb2.SendKvPart(request=kvd_pb2.SendKvRequest(
                    pool_id=pool_id, room="doomed", page_ids=[5, 6], peer_address=addr_b,
                    timeout_seconds=30, source_ready_event=event))
                while not first_token:
                    time.sleep(0.05)
                yield first_token[0]

            call = a.SendKvAhead.future(parts(), timeout=60)
            time.sleep(1.0)  # kvd has the request and is waiting for the event
            kill(worker)
            call.cancel()  # the dead worker's connection
            with pytest.raises(grpc.RpcError) as e:
                doomed.result(timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            later = expect("later")  # from the same pool, no event: must not queue behind it
            sent = a.SendKv(kvd_pb2.SendKvRequest(
                pool_id=pool_id, room="later", page_ids=[7, 8], peer_address=addr_b,
                aux=kvd_pb2.RoomAux(first_token_id=4), timeout_seconds=30), timeout=20)
            assert later.result(timeout=20).aux.first_token_id == 4 and sent.kv_bytes > 0
            _await_nothing_pinned(a, b, timeout=20,
                                  why="pages stayed pinned behind the dead event", poll=0.2)
        finally:
            kill(worker)


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_backend_moves_vram_pages_between_two_kvds(tmp_path, backend):
    with _kvds(tmp_path, backend, two=True) as (a, b):
        assert _move(a, b, 0, 1, f"room-{backend}") == backend
