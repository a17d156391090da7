"""KV transfer of one request between two GPUs through kvd, against a torch peer copy.

    python -m bench.kv_transfer_gpu [--repeats 20] [--warmup 3] [--cases local_ahead,...]
        [--out bench/results/kv_transfer-h100.json]

One 4,096-token request with a Llama-3.1-8B-shaped KV (32 layers, 8 KV heads, head dim 128,
bf16, 16-token pages: 256 pages of 2 MiB = 512 MiB) moves from a prefill pool on GPU 0 to a
decode pool on GPU 1. Two real kvd processes (backend nixl) own the VRAM pools: kvd A holds the
prefill pool (GPU 0) and a decode pool on GPU 1 for the same-node path, kvd B a decode pool on
GPU 1 for NIXL. This process plays the workers: AttachPool with a GPU placement, the CUDA IPC
handles opened as torch tensors, the source pages filled with random bytes, then per room
ExpectKv (decode) -> AwaitBootstrap (prefill, as before its forward pass) -> SendKv.

Cases (CASE_NOTES), interleaved per repetition, median of `--repeats` after `--warmup`:
- `torch_peer_copy` (the BASELINE): the same 512 MiB of the prefill pool copied as one
  contiguous block into a cuda:1 tensor (`.copy_`, both devices synchronized).
- `local_contiguous`: kvd A's same-node path (cudaMemcpyAsync peer copy per coalesced run;
  the pages are one run on both sides, as the allocator prefers: 1 descriptor). Like a decode
  worker with a VRAM pool, this process accepts a ready flag and a ready event: kvd answers
  ExpectKv once the copy is queued, with a flag (see below); with an event only, the decode
  side "has it" when the event completes (it synchronizes on it, with its IPC handle opened
  once per handle as the worker does).
- `local_contiguous_no_event`: the same room accepting neither (kvd answers after the copy,
  as before ready events).
- `nixl_contiguous`: kvd A -> kvd B through NIXL (UCX, VRAM -> VRAM), 1 descriptor.
- `local_fragmented`, `nixl_fragmented`: every other page on both sides: 256 descriptors.
- `local_one_page`, `nixl_one_page`: one page, so that e2e is mostly the control plane
  (gRPC, kvd's hand-off to its transfer thread, the decode side's notification).
  In the cases above `e2e_seconds` runs from issuing SendKv ("prefill done") to ExpectKv returning
  ("decode has it"): the control plane is on the critical path.
- `local_ahead`, `nixl_ahead`: the prefill worker's own path (services/prefill/kv_sender.py,
  SendKvAhead). This process plays its engine: on a stream of GPU 0 it queues GPU work standing
  in for the tail of the forward pass (PREFILL_TAIL_S of `torch.cuda._sleep`; a real
  4,096-token forward pass of an 8B model takes ~100 ms), records an IPC event after it, sends
  the room with that event at once, then waits for the event as the worker waits for its
  logits. `e2e_seconds` runs from that wait returning ("prefill done": the GPU has finished the
  KV) to "decode has it"; the first token goes out as the second message at "prefill done".
  kvd waits for the event on a thread of its own (polling it), which queues the copy the
  moment it completes (same node) or posts the NIXL write.
  Through NIXL this process accepts a ready flag, as a decode worker does (its pool has
  flags): kvd answers ExpectKv once the first token is known while the write is in flight,
  and the decode side "has it" when the flag says landed — polled every 20 us, as the
  worker's engine loop polls it (services/common/ready_flags.py).
- `nixl_ahead_no_flag`: `nixl_ahead` without accepting a ready flag: kvd answers after the
  landing (the worker's path before ready flags).
  The same-node path answers a decode side that accepts a ready flag with one too (set by
  kvd's thread that waits for the copy, the moment it is done on the source GPU), else with
  the ready event; `local_ahead_event` is `local_ahead` without accepting a flag.
`answered_seconds`: from the same start to ExpectKv's answer reaching this process (before its
ready event completes): the control plane's share. `transfer_seconds` is the write alone as kvd
timed it (SendKvResponse; the queued local copy is timed by CUDA events). Every repetition
zeroes the destination pages first and compares every byte afterwards. Goals (on the prefill
worker's path, the `_ahead` cases): local >= 0.9x, NIXL >= 0.8x the baseline's rate (ratio =
baseline median / case median, same bytes). GB = 1e9 bytes. Results, with the GPUs and driver,
go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import services  # noqa: F401 - first: sets gRPC's experiments, as in the workers

# isort: split
import grpc
import torch

from bench.procs import free_port, start, stop, wait_grpc
from services.common import cudart
from services.common.kvd_client import gpu_placement, map_ready_flags
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.common.ready_flags import LandingState, ReadyFlags
from services.common.timer_slack import use_fine_timer_slack
from services.common.vram import IpcMapping

CHILD_ENV = {"UCX_MODULES": "^ib", "PYTHONUNBUFFERED": "1"}
TOKENS, PAGE_SIZE = 4096, 16
NUM_PAGES = TOKENS // PAGE_SIZE  # 256 pages per request
POOL_PAGES = 2 * NUM_PAGES + 8
SHAPE = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}
PAGE_BYTES = SHAPE["num_layers"] * 2 * PAGE_SIZE * SHAPE["num_kv_heads"] * SHAPE["head_dim"] * 2
CONTIG = (list(range(5, 5 + NUM_PAGES)), list(range(200, 200 + NUM_PAGES)))
FRAG = (list(range(0, 2 * NUM_PAGES, 2)), list(range(1, 2 * NUM_PAGES, 2)))
ONE_PAGE = ([1], [3])
CASE_NOTES = {
    "torch_peer_copy": "BASELINE: the request's 512 MiB as one contiguous torch copy "
                       "cuda:0 -> cuda:1, synchronized",
    "local_contiguous": "kvd's same-node path, GPU 0 -> GPU 1 peer copy, pages one run on both "
                        "sides: 1 descriptor; the decode side accepts a ready flag and event "
                        "(answered with a flag once the copy is queued; 'has it' when the flag "
                        "says landed)",
    "local_contiguous_no_event": "the same without accepting a ready event: kvd answers "
                                 "after the copy",
    "nixl_contiguous": "two kvds, NIXL (UCX) VRAM -> VRAM, pages one run: 1 descriptor",
    "local_fragmented": "same-node path, every other page: 256 descriptors of 2 MiB",
    "nixl_fragmented": "NIXL, every other page: 256 descriptors of 2 MiB",
    "local_one_page": "same-node path, ONE 2 MiB page: the control plane's floor (no ratio: "
                      "other bytes than the baseline's)",
    "nixl_one_page": "NIXL, ONE 2 MiB page: the control plane's floor (no ratio)",
    "local_ahead": "the prefill worker's path, same node: SendKvAhead with the forward pass's "
                   "event before the GPU is done, kvd polls the event on a thread that queues "
                   "the copy; the decode side accepts a ready flag, which kvd's thread waiting "
                   "for the copy sets the moment it is done on the source GPU; e2e from "
                   "'prefill done' (GPU finished) to 'decode has it'; pages one run",
    "local_ahead_event": "local_ahead with a ready event instead of a flag: 'has it' when the "
                         "event recorded on the destination GPU after the copy completes",
    "nixl_ahead": "the prefill worker's path through NIXL: kvd polls the forward pass's event, "
                  "then posts the write; the decode side accepts a ready flag (answered while "
                  "the write is in flight, 'has it' when the flag says landed); e2e as "
                  "local_ahead; pages one run",
    "nixl_ahead_no_flag": "nixl_ahead without a ready flag: the decode side is answered after "
                          "the landing",
}
GOALS = {"local_ahead": 0.9, "nixl_ahead": 0.8}
PREFILL_TAIL_S = 0.005  # GPU work queued before "prefill done" in the `_ahead` cases
GB = 1e9


class Kvd:
    def __init__(self, tmp: Path, name: str) -> None:
        self.sock, port = str(tmp / f"{name}.sock"), free_port()
        self.address = f"127.0.0.1:{port}"
        self.log = tmp / f"{name}.log"
        self.proc = start(["-m", "services.kvd", "--host", "127.0.0.1", "--port", str(port),
                           "--socket", self.sock, "--backend", "nixl"], self.log, CHILD_ENV)
        wait_grpc(f"unix:{self.sock}", self.proc, self.log, timeout=120)
        self.stub = kvd_pb2_grpc.KvdServiceStub(grpc.insecure_channel(f"unix:{self.sock}"))

    def attach(self, worker: str, gpu: int) -> tuple[str, IpcMapping, torch.Tensor]:
        """(pool id, mapping, [pages, page_bytes] uint8 view on cuda:gpu); the pool's ready
        flags go to FLAGS."""
        layout = kvd_pb2.KvLayout(num_pages=POOL_PAGES, page_size=PAGE_SIZE, dtype="bfloat16",
                                  model="llama-3.1-8b-shape", **SHAPE)
        reply = self.stub.AttachPool(kvd_pb2.AttachPoolRequest(
            worker_id=worker, layout=layout, placement=gpu_placement(gpu)), timeout=120)
        mapping = IpcMapping.open(gpu, reply.cuda_ipc_handle, reply.total_bytes)
        view = torch.as_tensor(mapping, device=f"cuda:{gpu}").view(POOL_PAGES, PAGE_BYTES)
        flags = map_ready_flags(reply, POOL_PAGES)
        assert flags is not None, "kvd keeps no ready flags"
        FLAGS[reply.pool_id] = flags
        return reply.pool_id, mapping, view


READY_EVENTS: dict[bytes, torch.cuda.Event] = {}  # as a decode worker caches kvd's events
FLAGS: dict[str, ReadyFlags] = {}  # pool id -> its ready flags, mapped as a worker maps them
FLAG_POLL_S = 20e-6  # the decode engine loop's pause between looks at a pending flag


class Expecting:
    """The decode worker's side of one room, issued before the prefill side sends: ExpectKv
    (accepting a ready event, as a decode worker with a VRAM pool does, unless told not to),
    then the prefill side's AwaitBootstrap. `arrived`: when the decode side has the KV —
    ExpectKv answered and the ready event it carried (if any) completed, or the ready flag it
    carried (if any; `accept_flag`) said landed."""

    def __init__(self, send: Kvd, recv: Kvd, pool: str, room: str, dst: list[int],
                 accept_event: bool, accept_flag: bool = True) -> None:
        self.answered = self.arrived = 0.0
        self.pool = pool
        self._landed = threading.Event()
        self._future = recv.stub.ExpectKv.future(kvd_pb2.ExpectKvRequest(
            pool_id=pool, room=room, page_ids=dst, peer_address=send.address,
            timeout_seconds=60, accept_ready_event=accept_event,
            accept_ready_flag=accept_flag), timeout=120)
        self._future.add_done_callback(self._on_done)
        send.stub.AwaitBootstrap(kvd_pb2.AwaitBootstrapRequest(room=room, timeout_seconds=60),
                                 timeout=120)

    def _on_done(self, future: grpc.Future) -> None:
        self.answered = time.perf_counter()
        try:
            got = future.result()
            if got.HasField("ready_flag"):
                use_fine_timer_slack()  # as the engine loop's thread has it
                landing = FLAGS[self.pool].landing(got.ready_flag.index, got.ready_flag.ticket)
                deadline = time.monotonic() + 60
                while (state := landing.poll()) is LandingState.PENDING:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the ready flag stayed pending for 60 s")
                    time.sleep(FLAG_POLL_S)
                if state is not LandingState.LANDED:
                    raise RuntimeError(f"the room failed after its early answer: {state}")
            handle = got.ready_event
            if handle:
                event = READY_EVENTS.get(handle)
                if event is None:
                    event = READY_EVENTS[handle] = torch.cuda.Event.from_ipc_handle(1, handle)
                event.synchronize()
        finally:
            self.arrived = time.perf_counter()
            self._landed.set()

    def sample(self, sent: kvd_pb2.SendKvResponse, start_t: float, returned: float,
               num_pages: int) -> dict[str, Any]:
        """The room's times from `start_t` ("prefill done"), once the decode side has it."""
        got = self._future.result(timeout=120)
        assert self._landed.wait(10) and got.kv_bytes == sent.kv_bytes == num_pages * PAGE_BYTES
        return {"e2e_seconds": self.arrived - start_t, "transfer_seconds": sent.transfer_seconds,
                "answered_seconds": self.answered - start_t,
                "ready_event": bool(got.ready_event),
                "ready_flag": got.HasField("ready_flag"),
                "send_kv_return_seconds": returned - start_t, "kv_bytes": sent.kv_bytes,
                "num_descriptors": sent.num_descriptors, "backend": sent.backend}


def kvd_room(send: Kvd, recv: Kvd, pools: tuple[str, str], room: str, src: list[int],
             dst: list[int], accept_event: bool = True) -> dict[str, Any]:
    """One room as the workers ran it before SendKvAhead (SendKv once the first token is
    known); times as the workers see them."""
    expecting = Expecting(send, recv, pools[1], room, dst, accept_event, accept_event)
    start_t = time.perf_counter()
    sent = send.stub.SendKv(kvd_pb2.SendKvRequest(
        pool_id=pools[0], room=room, page_ids=src, peer_address=recv.address,
        aux=kvd_pb2.RoomAux(first_token_id=7), timeout_seconds=60), timeout=120)
    return expecting.sample(sent, start_t, time.perf_counter(), len(src))


class Prefill:
    """The prefill engine's side of the `_ahead` cases: its stream on GPU 0 and the IPC event
    it records after the forward pass (reused per room, as the engine reuses its events once
    a room's KV has been sent)."""

    def __init__(self) -> None:
        self.stream = torch.cuda.Stream(0)
        self.event = torch.cuda.Event(interprocess=True)
        self.cycles = int(PREFILL_TAIL_S * _sleep_cycles_per_second(self.stream))
        self.event.record(self.stream)
        self.handle = bytes(self.event.ipc_handle())

    def forward(self) -> None:
        """Queue the stand-in for the forward pass's tail, then the event."""
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(self.cycles)
        self.event.record(self.stream)


def _sleep_cycles_per_second(stream: torch.cuda.Stream) -> float:
    """`torch.cuda._sleep` spins for a number of GPU clock cycles: how many make a second
    (timed with CUDA events, at the clock the GPU runs now)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000)  # clocks up
        start.record(stream)
        torch.cuda._sleep(20_000_000)
        end.record(stream)
    end.synchronize()
    return 20_000_000 / (start.elapsed_time(end) / 1e3)


def kvd_room_ahead(send: Kvd, recv: Kvd, pools: tuple[str, str], room: str, src: list[int],
                   dst: list[int], prefill: Prefill, accept_flag: bool = True
                   ) -> dict[str, Any]:
    """One room as the prefill worker sends it now (SendKvAhead; see the module doc)."""
    expecting = Expecting(send, recv, pools[1], room, dst, accept_event=True,
                          accept_flag=accept_flag)
    first_token: queue.Queue[kvd_pb2.SendKvPart] = queue.Queue()

    def parts() -> Iterator[kvd_pb2.SendKvPart]:
        yield kvd_pb2.SendKvPart(request=kvd_pb2.SendKvRequest(
            pool_id=pools[0], room=room, page_ids=src, peer_address=recv.address,
            timeout_seconds=60, source_ready_event=prefill.handle))
        yield first_token.get(timeout=60)

    prefill.forward()
    issued = time.perf_counter()
    sent_future = send.stub.SendKvAhead.future(parts(), timeout=120)
    prefill.event.synchronize()  # the worker's wait for its logits
    start_t = time.perf_counter()
    first_token.put(kvd_pb2.SendKvPart(aux=kvd_pb2.RoomAux(first_token_id=7)))
    sent = sent_future.result(timeout=120)
    return {**expecting.sample(sent, start_t, time.perf_counter(), len(src)),
            "tail_seconds": start_t - issued}


def verify(src: torch.Tensor, dst: torch.Tensor, pages: tuple[list[int], list[int]],
           what: str) -> None:
    expected = src[pages[0]].to(dst.device)
    if not torch.equal(dst[pages[1]], expected):
        raise AssertionError(f"{what}: destination pages differ from the source")


def summarize(samples: list[dict[str, Any]], baseline: list[float]) -> dict[str, Any]:
    e2e = [s["e2e_seconds"] for s in samples]
    med = statistics.median(e2e)
    num_bytes = samples[0].get("kv_bytes", NUM_PAGES * PAGE_BYTES)
    out: dict[str, Any] = {"median_seconds": med, "gb_per_s": num_bytes / med / GB,
                           "min_seconds": min(e2e), "max_seconds": max(e2e)}
    same_bytes = num_bytes == NUM_PAGES * PAGE_BYTES  # ratios only for the baseline's bytes
    if same_bytes:
        out |= {"ratio_vs_baseline": statistics.median(baseline) / med,
                "ratio_per_repetition_median": statistics.median(
                    b / s for b, s in zip(baseline, e2e, strict=True))}
    if "transfer_seconds" in samples[0]:
        write = statistics.median(s["transfer_seconds"] for s in samples)
        out |= {"transfer_median_seconds": write,
                "transfer_gb_per_s": num_bytes / write / GB,
                "send_kv_return_median_seconds": statistics.median(
                    s["send_kv_return_seconds"] for s in samples),
                "answered_median_seconds": statistics.median(
                    s["answered_seconds"] for s in samples),
                "num_descriptors": samples[0]["num_descriptors"],
                "backend": samples[0]["backend"],
                "answered_with_ready_event": samples[0]["ready_event"],
                "answered_with_ready_flag_fraction": statistics.mean(
                    s["ready_flag"] for s in samples)}
        if "tail_seconds" in samples[0]:  # sent ahead: how long the GPU still ran after
            out["prefill_tail_median_seconds"] = statistics.median(
                s["tail_seconds"] for s in samples)
        if same_bytes:
            out["transfer_ratio_vs_baseline"] = statistics.median(baseline) / write
    return out


def machine() -> dict[str, Any]:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines()
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[:3]
    except (OSError, subprocess.TimeoutExpired):
        smi, topo = [], []
    packages: dict[str, str | None] = {}
    for name in ("torch", "cuda-bindings", "nixl", "nixl-cu13", "grpcio", "protobuf"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "nvidia_smi": smi, "topology": topo, "driver_cuda": cudart.driver_version(),
            "torch_cuda": torch.version.cuda, "cpu_cores": os.cpu_count(),
            "python": platform.python_version(), "packages": packages,
            "env": {k: os.environ.get(k) for k in ("UCX_MODULES", "UCX_TLS",
                                                   "SGLANG_DISAGGREGATION_NIXL_BACKEND")}}


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    a, b = Kvd(tmp, "a"), Kvd(tmp, "b")
    mappings: list[IpcMapping] = []
    try:
        prefill_id, m0, src = a.attach("prefill-0", 0)
        local_id, m1, dst_local = a.attach("decode-local-1", 1)
        nixl_id, m2, dst_nixl = b.attach("decode-nixl-1", 1)
        mappings += [m0, m1, m2]
        gen = torch.Generator(device="cuda:0").manual_seed(1)
        src.copy_(torch.randint(0, 256, src.shape, generator=gen, device="cuda:0",
                                dtype=torch.uint8))
        block = torch.empty(NUM_PAGES * PAGE_BYTES, dtype=torch.uint8, device="cuda:1")
        first, last = CONTIG[0][0], CONTIG[0][-1] + 1

        def baseline() -> dict[str, Any]:
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            t = time.perf_counter()
            block.copy_(src[first:last].view(-1))
            torch.cuda.synchronize(0)
            torch.cuda.synchronize(1)
            seconds = time.perf_counter() - t
            assert torch.equal(block.view(NUM_PAGES, PAGE_BYTES), src[first:last].to("cuda:1"))
            block.zero_()
            return {"e2e_seconds": seconds}

        prefill = Prefill()

        def through(kvd: Kvd, pool: str, dst: torch.Tensor, pages: tuple[list[int], list[int]],
                    name: str, accept_event: bool = True, ahead: bool = False,
                    accept_flag: bool = True) -> Callable[[int], dict[str, Any]]:
            def once(rep: int) -> dict[str, Any]:
                dst[pages[1]] = 0
                torch.cuda.synchronize(1)
                if ahead:
                    sample = kvd_room_ahead(a, kvd, (prefill_id, pool), f"{name}-{rep}", *pages,
                                            prefill, accept_flag)
                else:
                    sample = kvd_room(a, kvd, (prefill_id, pool), f"{name}-{rep}", *pages,
                                      accept_event=accept_event)
                verify(src, dst, pages, f"{name} repetition {rep}")
                return sample
            return once

        cases: dict[str, Callable[[int], dict[str, Any]]] = {
            "torch_peer_copy": lambda rep: baseline(),
            "local_ahead": through(a, local_id, dst_local, CONTIG, "local_ahead", ahead=True),
            "local_ahead_event": through(a, local_id, dst_local, CONTIG, "local_ahead_event",
                                         ahead=True, accept_flag=False),
            "nixl_ahead": through(b, nixl_id, dst_nixl, CONTIG, "nixl_ahead", ahead=True),
            "nixl_ahead_no_flag": through(b, nixl_id, dst_nixl, CONTIG, "nixl_ahead_no_flag",
                                          ahead=True, accept_flag=False),
            "local_contiguous": through(a, local_id, dst_local, CONTIG, "local_contiguous"),
            "local_contiguous_no_event": through(a, local_id, dst_local, CONTIG,
                                                 "local_contiguous_no_event", False),
            "nixl_contiguous": through(b, nixl_id, dst_nixl, CONTIG, "nixl_contiguous"),
            "local_fragmented": through(a, local_id, dst_local, FRAG, "local_fragmented"),
            "nixl_fragmented": through(b, nixl_id, dst_nixl, FRAG, "nixl_fragmented"),
            "local_one_page": through(a, local_id, dst_local, ONE_PAGE, "local_one_page"),
            "nixl_one_page": through(b, nixl_id, dst_nixl, ONE_PAGE, "nixl_one_page"),
        }
        if args.cases:
            wanted = {"torch_peer_copy", *args.cases.split(",")}
            unknown = wanted - cases.keys()
            if unknown:
                raise SystemExit(f"kv_transfer_gpu: no such cases: {sorted(unknown)}")
            cases = {name: once for name, once in cases.items() if name in wanted}
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
        failed: dict[str, str] = {}  # a case that raised once is reported, not run again
        for rep in range(args.warmup + args.repeats):
            for name, once in cases.items():
                if name in failed:
                    continue
                try:
                    sample = once(rep)
                except (AssertionError, grpc.RpcError, RuntimeError) as e:
                    if name == "torch_peer_copy":
                        raise
                    failed[name] = f"repetition {rep}: {type(e).__name__}: {e}"
                    print(f"{name} failed: {failed[name]}", file=sys.stderr)
                    continue
                if rep >= args.warmup:
                    samples[name].append(sample)
        base = [s["e2e_seconds"] for s in samples["torch_peer_copy"]]
        results: dict[str, dict[str, Any]] = {}
        for name, case_samples in samples.items():
            if name in failed:
                results[name] = {"note": CASE_NOTES[name], "error": failed[name]}
                continue
            results[name] = {"note": CASE_NOTES[name], **summarize(case_samples, base)}
            if name in GOALS:
                results[name]["goal_ratio"] = GOALS[name]
                results[name]["meets_goal"] = results[name]["ratio_vs_baseline"] >= GOALS[name]
        return results
    finally:
        for mapping in mappings:
            mapping.close()
        for kvd in (a, b):
            stop(kvd.proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", default="", help="comma-separated cases to run (the baseline "
                   "always runs); all by default")
    p.add_argument("--out", default="bench/results/kv_transfer-h100.json")
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        print("kv_transfer_gpu: needs two CUDA GPUs", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="kv-gpu-"))
    try:
        results = run(args, tmp)
    finally:
        for log in tmp.glob("*.log"):
            print(f"--- {log.name} (tail)\n{log.read_text(errors='replace')[-1500:]}")
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"bench": "kv_transfer_gpu", "kv_bytes": NUM_PAGES * PAGE_BYTES,
           "tokens": TOKENS, "page_size": PAGE_SIZE, "page_bytes": PAGE_BYTES, **SHAPE,
           "dtype": "bfloat16", "repeats": args.repeats, "warmup": args.warmup,
           "machine": machine(), "cases": results, "unit_gb": GB,
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'case':<18} {'median ms':>10} {'GB/s':>8} {'ratio':>7} {'write ms':>9} {'descs':>6}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<18} FAILED: {r['error'][:300]}")
            continue
        print(f"{name:<18} {r['median_seconds'] * 1e3:>10.3f} {r['gb_per_s']:>8.1f} "
              f"{r.get('ratio_vs_baseline', float('nan')):>7.3f} "
              f"{r.get('transfer_median_seconds', float('nan')) * 1e3:>9.3f} "
              f"{r.get('num_descriptors', 1):>6}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
