"""PD under faults: killed workers and kvds, bad input. Every request ends — an answer or a
clear status — within the seed's timeouts (set small here), and every kvd and worker is back
to its page baseline afterwards: nothing pinned, no open room, every worker page free.

Two "nodes" on loopback (a kvd each), as in test_pd_equals_unified; each test gets a fresh
deployment, since most of them kill part of it. NIXL throughout; the kills that involve the
transfer path run over Mooncake too."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.shm import unlink_segment
from tests.pd.harness import (
    Node,
    decode_leg,
    kvd_stats,
    launch_worker,
    pd_generate_at,
    pd_request,
    prefill_leg,
    start_node,
    unified_token_ids,
    wait_baseline,
)
from tests.procs import free_port, kill, start_kvd_at, stop
from tests.tiny_models import VOCAB_SIZE

BOOTSTRAP_TIMEOUT = 3.0
WAITING_TIMEOUT = 3.0
HEARTBEAT_INTERVAL = 0.3
HEARTBEAT_MAX_FAILURE = 2
KVD_ENV = {
    "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": str(BOOTSTRAP_TIMEOUT),
    "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": str(WAITING_TIMEOUT),
    "SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL": str(HEARTBEAT_INTERVAL),
    "SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE": str(HEARTBEAT_MAX_FAILURE),
}
WORKER_ENV = {"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": str(WAITING_TIMEOUT)}
SLACK = 2.0  # process scheduling on a loaded 2-core machine


@dataclass
class Cluster:
    """Nodes (kvds) and workers on loopback; `stop_all` ends every process it started.
    `p`/`d` are the prefill and decode nodes, `prefill`/`decode` their workers' host:port."""

    tmp: Path
    model: str
    backend: str
    nodes: list[Node] = field(default_factory=list)
    workers: list[tuple[object, int, str, Node]] = field(default_factory=list)  # proc,port,mode
    dead_segments: list[str] = field(default_factory=list)  # of SIGKILLed kvds
    p: Node | None = None
    d: Node | None = None
    prefill: str = ""
    decode: str = ""

    def add_node(self, name: str) -> Node:
        node = start_node(self.tmp, name, self.backend, env=KVD_ENV)
        self.nodes.append(node)
        return node

    def add_worker(self, mode: str, node: Node, port: int | None = None,
                   extra: list[str] | None = None) -> str:
        proc, port = launch_worker(self.tmp, mode, self.model, node, self.backend, port=port,
                                   extra=extra, env=WORKER_ENV)
        self.workers.append((proc, port, mode, node))
        return f"127.0.0.1:{port}"

    def restart_kvd(self, node: Node, name: str) -> Node:
        """The node's kvd again (after it died), at the same peer address and socket."""
        host, port = node.kvd_address.rsplit(":", 1)
        proc, sock, address = start_kvd_at(self.tmp, name, int(port), self.backend, host,
                                            KVD_ENV)
        self.nodes.append(Node(proc, sock, address))
        return self.nodes[-1]

    def kill_worker(self, target: str) -> None:
        for proc, port, _, _ in self.workers:
            if port == _port(target):
                kill(proc)

    async def kill_kvd(self, node: Node) -> None:
        """SIGKILL a kvd; its pools' shared memory is removed (a dead kvd cannot)."""
        stats = await kvd_stats(node)
        kill(node.kvd)
        self.dead_segments.extend(p.pool_id for p in stats.pools)  # segment name = pool id

    def live(self) -> tuple[list[Node], list[tuple[str, str]]]:
        """The kvds and (target, mode) workers still running, for `wait_baseline`."""
        nodes = [n for n in self.nodes if n.kvd.poll() is None]
        workers = [(f"127.0.0.1:{port}", mode) for proc, port, mode, node in self.workers
                   if proc.poll() is None and node.kvd.poll() is None]
        return nodes, workers

    def assert_baseline(self, timeout: float = 5.0) -> float:
        nodes, workers = self.live()
        return asyncio.run(wait_baseline(nodes, workers, timeout))

    def stop_all(self) -> None:
        for proc, *_ in self.workers:
            stop(proc)
        for node in self.nodes:
            stop(node.kvd)
        for name in self.dead_segments:
            unlink_segment(name)


@pytest.fixture
def backend():
    return "nixl"  # tests that parametrize `backend` override this


@pytest.fixture
def cluster(request, model, tmp_path, backend):
    """Node P: kvd + prefill worker (extra flags: the parameter, if any); node D: kvd +
    decode worker."""
    c = Cluster(tmp_path, str(model), backend)
    try:
        c.p, c.d = c.add_node("node-p"), c.add_node("node-d")
        c.prefill = c.add_worker("prefill", c.p, extra=getattr(request, "param", None))
        c.decode = c.add_worker("decode", c.d)
        c.assert_baseline()
        yield c
    finally:
        c.stop_all()


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist() for n in lengths]


def _port(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def _assert_serves(c: Cluster, decode: str, seed: int) -> None:
    """4 concurrent PD rooms from c.prefill to `decode` (on node D) equal unified."""
    requests = [(p, 8) for p in _prompts([5, 17, 33, 64], seed)]

    async def run():
        return await asyncio.gather(*[pd_generate_at(
            c.prefill, decode, c.p.kvd_address, c.d.kvd_address, pd_request(p, n))
            for p, n in requests])

    assert [ids for ids, _ in asyncio.run(run())] == unified_token_ids(c.model, requests)


def _room() -> str:
    return uuid.uuid4().hex


async def _outcome(coro, t0: float) -> tuple[grpc.StatusCode, str, float]:
    """(status, details, seconds since t0) of a leg, OK when it answered."""
    try:
        await coro
        return grpc.StatusCode.OK, "", time.monotonic() - t0
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or "", time.monotonic() - t0


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_decode_worker_killed_mid_flight(cluster):
    """The decode worker dies with rooms in three states: 8 streaming long generations, 4
    whose prefill waits for the bootstrap, computing nothing (their decode legs come too
    late), 4 bootstrapped and waiting for KV (their prefill legs come late). The prefill side
    gives up the first 4 within the bootstrap timeout, both kvds and the prefill worker hold
    nothing once the timeouts pass, and a decode worker restarted on the node (re-attaching
    its pool) serves new rooms with the same prefill worker."""
    c = cluster
    long_prompts = _prompts([20, 30] * 4, 1)
    pending_prompts, waiting_prompts = _prompts([40, 50, 60, 70], 2), _prompts([9, 19, 29, 39], 3)
    pending_rooms = [_room() for _ in pending_prompts]
    waiting_rooms = [_room() for _ in waiting_prompts]

    async def run():
        # both legs of 8 long generations; a room counts as started at its first token
        started = [asyncio.Event() for _ in long_prompts]
        streams = []
        for p, ev in zip(long_prompts, started, strict=True):
            room, request = _room(), pd_request(p, 480 - len(p))
            streams.append(asyncio.create_task(_outcome(asyncio.gather(
                decode_leg(c.decode, request, room, c.p.kvd_address, timeout=30, started=ev),
                prefill_leg(c.prefill, request, room, c.d.kvd_address)), 0.0)))
        await asyncio.wait_for(asyncio.gather(*[ev.wait() for ev in started]), 30)
        t_sent = time.monotonic()
        pending = [asyncio.create_task(_outcome(
            prefill_leg(c.prefill, pd_request(p, 8), room, c.d.kvd_address), t_sent))
            for p, room in zip(pending_prompts, pending_rooms, strict=True)]
        waiting = [asyncio.create_task(_outcome(decode_leg(
            c.decode, pd_request(p, 8), room, c.p.kvd_address), t_sent))
            for p, room in zip(waiting_prompts, waiting_rooms, strict=True)]

        async def rooms_open():  # prefills wait for a destination, computing nothing
            p, d = await kvd_stats(c.p), await kvd_stats(c.d)   # decode pages bound to rooms
            return (p.open_rooms == len(pending) and sum(x.pinned_pages for x in p.pools) == 0
                    and d.open_rooms == len(waiting))

        await _until(rooms_open, 10, "the rooms to open on both nodes")
        c.kill_worker(c.decode)
        t_kill = time.monotonic()
        # the gateway's late legs: decode legs find no decode worker, prefill legs run
        late_decodes = await asyncio.gather(*[_outcome(decode_leg(
            c.decode, pd_request(p, 8), room, c.p.kvd_address), t_kill)
            for p, room in zip(pending_prompts, pending_rooms, strict=True)])
        late_prefills = await asyncio.gather(*[_outcome(prefill_leg(
            c.prefill, pd_request(p, 8), room, c.d.kvd_address), t_kill)
            for p, room in zip(waiting_prompts, waiting_rooms, strict=True)])
        return (await asyncio.gather(*streams), await asyncio.gather(*pending),
                await asyncio.gather(*waiting), late_decodes, late_prefills, t_kill)

    streams, pending, waiting, late_decodes, late_prefills, t_kill = asyncio.run(run())
    assert all(code is grpc.StatusCode.UNAVAILABLE for code, _, _ in streams), streams
    assert all(code is grpc.StatusCode.UNAVAILABLE for code, _, _ in waiting), waiting
    assert all(code is grpc.StatusCode.UNAVAILABLE and t < SLACK
               for code, _, t in late_decodes), late_decodes
    for code, details, t in pending:
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "bootstrap" in details, details
        assert t < BOOTSTRAP_TIMEOUT + SLACK, t
    for code, details, t in late_prefills:  # the KV may still land in the kept pages
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), (code, details)
        assert t < WAITING_TIMEOUT + SLACK, t
    # both kvds and the prefill worker are back to their baselines
    nodes, workers = c.live()
    assert workers == [(c.prefill, "prefill")]
    left = max(BOOTSTRAP_TIMEOUT, WAITING_TIMEOUT) + SLACK - (time.monotonic() - t_kill)
    asyncio.run(wait_baseline(nodes, workers, timeout=max(0.0, left)))

    # the decode worker restarts (re-attaching its pool): the prefill worker serves it again
    c.add_worker("decode", c.d, port=_port(c.decode))
    _assert_serves(c, c.decode, 7)
    # and a decode worker new to the node, whose pool the prefill node's kvd never saw
    _assert_serves(c, c.add_worker("decode", c.d), 8)
    c.assert_baseline()


# a prefill worker slow enough to be caught mid-prompt
@pytest.mark.parametrize("cluster", [["--chunked-prefill-size", "8"]], indirect=True,
                         ids=["slow-prefill"])
def test_prefill_worker_killed_mid_flight(cluster):
    """Prefill dies mid-flight — 12 decode legs wait for their KV, the prefill worker works
    through their prompts 8 tokens a step and is killed when the first one is sent: every
    decode leg ends (its KV, or DEADLINE_EXCEEDED) within the waiting timeout, a prefill that
    answered means its decode leg decodes, and the decode side is back to its baseline."""
    c = cluster
    prompts = _prompts([160] * 12, 4)
    rooms = [_room() for _ in prompts]

    async def run():
        t_sent = time.monotonic()
        decodes = [asyncio.create_task(_outcome(decode_leg(
            c.decode, pd_request(p, 8), room, c.p.kvd_address, timeout=30), t_sent))
            for p, room in zip(prompts, rooms, strict=True)]

        async def all_waiting():  # pages reserved and bound to the rooms on node D
            return (await kvd_stats(c.d)).open_rooms == len(prompts)

        await _until(all_waiting, 10, "the decode legs to wait for their KV")
        prefills = [asyncio.create_task(_outcome(prefill_leg(
            c.prefill, pd_request(p, 8), room, c.d.kvd_address), t_sent))
            for p, room in zip(prompts, rooms, strict=True)]
        await asyncio.wait(prefills, return_when=asyncio.FIRST_COMPLETED)
        c.kill_worker(c.prefill)
        return await asyncio.gather(*decodes), await asyncio.gather(*prefills)

    decodes, prefills = asyncio.run(run())
    assert [code for code, _, _ in prefills].count(grpc.StatusCode.OK) >= 1
    assert [code for code, _, _ in prefills].count(grpc.StatusCode.UNAVAILABLE) >= 1, prefills
    for (code, details, t), (prefill_code, _, _) in zip(decodes, prefills, strict=True):
        assert t < WAITING_TIMEOUT + SLACK, t
        if prefill_code is grpc.StatusCode.OK:
            assert code is grpc.StatusCode.OK, details
        else:  # killed before it answered: its KV may have landed, or never will
            assert prefill_code is grpc.StatusCode.UNAVAILABLE
            assert code is grpc.StatusCode.OK or (
                code is grpc.StatusCode.DEADLINE_EXCEEDED
                and "no KV from the prefill side" in details) or (
                code is grpc.StatusCode.UNAVAILABLE  # its kvd saw the send cancelled
                and "prefill side gave up" in details), (code, details)
    assert any(code is grpc.StatusCode.DEADLINE_EXCEEDED for code, _, _ in decodes)
    c.assert_baseline()


@pytest.mark.parametrize("backend", ["nixl", "mooncake"])
def test_prefill_kvd_killed(cluster):
    """The prefill node's kvd dies while 4 decode legs wait on it: the decode node's kvd
    misses its heartbeats and each leg fails UNAVAILABLE, saying so, well before the waiting
    timeout; the decode node is back to its baseline. Restarted at the same address (twice,
    the second time unnoticed by heartbeats), the prefill node serves rooms again."""
    c = cluster
    prompts = _prompts([12, 24, 36, 48], 5)

    async def run():
        rooms = [_room() for _ in prompts]
        decodes = [asyncio.create_task(_outcome(decode_leg(
            c.decode, pd_request(p, 8), room, c.p.kvd_address, timeout=30), 0.0))
            for p, room in zip(prompts, rooms, strict=True)]
        # every room bootstrapped at the prefill kvd: a kill now can only be seen by heartbeats
        async with grpc.aio.insecure_channel(f"unix:{c.p.socket}") as ch:
            stub = kvd_pb2_grpc.KvdServiceStub(ch)
            booted = asyncio.ensure_future(asyncio.gather(*(stub.AwaitBootstrap(
                kvd_pb2.AwaitBootstrapRequest(room=room, timeout_seconds=10), timeout=15)
                for room in rooms)))
            await asyncio.wait({booted, *decodes}, return_when=asyncio.FIRST_COMPLETED)
            ended = [d.result() for d in decodes if d.done()]
            assert not ended, f"decode legs ended before every room bootstrapped: {ended}"
            await booted
        await asyncio.sleep(0.2)  # and the Bootstrap's answers back at the decode kvd
        await c.kill_kvd(c.p)
        t_kill = time.monotonic()
        return [(code, d, t - t_kill) for code, d, t in await asyncio.gather(*decodes)]

    bound = HEARTBEAT_INTERVAL * HEARTBEAT_MAX_FAILURE + 1.5
    assert bound < WAITING_TIMEOUT  # a heartbeat failure, not the waiting timeout
    for code, details, t in asyncio.run(run()):
        assert code is grpc.StatusCode.UNAVAILABLE and "heartbeats" in details, details
        assert t < bound, t
    c.assert_baseline()

    # the prefill node comes back at the same addresses: its rooms flow again
    c.kill_worker(c.prefill)
    c.p = c.restart_kvd(c.p, "node-p")
    c.add_worker("prefill", c.p, port=_port(c.prefill))
    _assert_serves(c, c.decode, 9)
    # it crashes and comes back again, this time with no room waiting on it (no heartbeat
    # told the decode node): the decode node's kvd handshakes with the new one all the same
    asyncio.run(c.kill_kvd(c.p))
    c.kill_worker(c.prefill)
    c.p = c.restart_kvd(c.p, "node-p")
    c.add_worker("prefill", c.p, port=_port(c.prefill))
    _assert_serves(c, c.decode, 10)
    c.assert_baseline()


def test_bad_input_in_pd_mode(cluster):
    """Bad input on the workers' gRPC surface answers the right status at once, and a room
    whose two sides disagree on the KV layout fails on both sides without a hang."""
    c = cluster
    node_8 = c.add_node("node-d8")  # a decode worker with 8-token pages, on its own node
    decode_8 = c.add_worker("decode", node_8, extra=["--page-size", "8"])
    prompt = _prompts([21], 6)[0]

    async def run():
        async with grpc.aio.insecure_channel(c.decode) as dch, \
                grpc.aio.insecure_channel(c.prefill) as pch:
            decode = worker_pb2_grpc.GenerateServiceStub(dch)
            prefill = worker_pb2_grpc.PrefillServiceStub(pch)
            no_room = await _outcome(_drain(decode.Generate(pd_request(prompt, 4))), 0.0)
            no_room_prefill = await _outcome(prefill.Prefill(
                worker_pb2.PrefillRequest(request=pd_request(prompt, 4))), 0.0)
        t0 = time.monotonic()
        unreachable = await _outcome(decode_leg(c.decode, pd_request(prompt, 4), _room(),
                                                nowhere), t0)
        room = _room()
        t0 = time.monotonic()
        mismatch = await asyncio.gather(
            _outcome(decode_leg(decode_8, pd_request(prompt, 4), room, c.p.kvd_address), t0),
            _outcome(prefill_leg(c.prefill, pd_request(prompt, 4), room, node_8.kvd_address),
                     t0))
        return no_room, no_room_prefill, unreachable, mismatch

    nowhere = f"127.0.0.1:{free_port()}"  # no kvd listens there
    no_room, no_room_prefill, unreachable, (decode_side, prefill_side) = asyncio.run(run())
    assert no_room[0] is grpc.StatusCode.INVALID_ARGUMENT and "disaggregation" in no_room[1]
    assert no_room_prefill[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert "disaggregation" in no_room_prefill[1]
    code, details, t = unreachable
    assert code is grpc.StatusCode.UNAVAILABLE and nowhere in details and t < SLACK, unreachable
    code, details, t = prefill_side
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "page_size" in details, prefill_side
    code, details, t = decode_side  # told by the prefill side, not left to time out
    assert code is grpc.StatusCode.UNAVAILABLE and "layouts differ" in details, decode_side
    assert t < SLACK, t
    c.assert_baseline()


async def _drain(stream) -> None:
    async for _ in stream:
        pass
