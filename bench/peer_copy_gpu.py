"""Ways to copy one request's KV bytes from GPU 0 to GPU 1, against torch's peer copy.

    python -m bench.peer_copy_gpu [--repeats 20] [--warmup 3]
        [--out bench/results/peer_copy-h100.json]

The bytes of one 4,096-token request with a Llama-3.1-8B-shaped KV (512 MiB, 256 pages of
2 MiB), in this process, no kvd: what the same-node path can get from each copy mechanism.
Cases (CASE_NOTES), interleaved per repetition, median of `--repeats` after `--warmup`, each
timed from issuing to its stream synchronized (the baseline: both devices synchronized):
- `torch_peer_copy` (the BASELINE): `dst.copy_(src)`, one contiguous block.
- `memcpy_on_source` / `memcpy_on_destination`: one `cudaMemcpyAsync` (the copy engines) on a
  stream of GPU 0 / GPU 1.
- `kernel_push` / `kernel_pull`: bench/sm_copy_kernel.py's SM-driven kernel, one
  descriptor, launched on GPU 0 (stores over NVLink) / GPU 1 (loads over NVLink).
- `memcpy_on_source_256` / `kernel_push_256`: every other 2 MiB page of a 1 GiB source into
  every other page of the destination: 256 descriptors (cudaMemcpyAsync each / one launch).
Every case's destination is compared with its source after each repetition. Also measured:
`gil_free_fraction`, how much a Python loop in the main thread keeps running while another
thread waits in `cudaStreamSynchronize` for copies (1.0: the wait releases the GIL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.kv_transfer_gpu import machine
from bench.sm_copy_kernel import BatchedCopy
from services.common import cudart

PAGE_BYTES, NUM_PAGES = 2 << 20, 256
NUM_BYTES = PAGE_BYTES * NUM_PAGES
GB = 1e9
CASE_NOTES = {
    "torch_peer_copy": "BASELINE: dst.copy_(src), 512 MiB contiguous, cuda:0 -> cuda:1",
    "memcpy_on_source": "one cudaMemcpyAsync on a stream of GPU 0 (copy engines)",
    "memcpy_on_destination": "one cudaMemcpyAsync on a stream of GPU 1 (copy engines)",
    "kernel_push": "SM copy kernel on GPU 0, stores over NVLink, one descriptor",
    "kernel_pull": "SM copy kernel on GPU 1, loads over NVLink, one descriptor",
    "memcpy_on_source_256": "256 cudaMemcpyAsync of 2 MiB (every other page) on GPU 0",
    "kernel_push_256": "SM copy kernel on GPU 0, 256 descriptors of 2 MiB in one launch",
}


def gil_free_fraction(src: torch.Tensor, dst: torch.Tensor, stream: Any) -> float:
    """Main-thread loop iterations per second while a thread waits on copies, over the same
    loop's rate alone."""
    def spin(seconds: float, stop: threading.Event | None = None) -> float:
        n, t0 = 0, time.perf_counter()
        while (stop is None and time.perf_counter() - t0 < seconds) or \
                (stop is not None and not stop.is_set()):
            n += 1
        return n / (time.perf_counter() - t0)

    alone = spin(0.2)
    done = threading.Event()

    def copies() -> None:
        for _ in range(40):
            cudart.copy_async(dst.data_ptr(), src.data_ptr(), NUM_BYTES, stream)
            cudart.stream_synchronize(stream)
        done.set()

    worker = threading.Thread(target=copies)
    worker.start()
    during = spin(0.0, done)
    worker.join()
    return during / alone


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.cuda.set_device(0)
    src = torch.randint(0, 256, (2 * NUM_BYTES,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros(2 * NUM_BYTES, dtype=torch.uint8, device="cuda:1")
    for a, b in ((0, 1), (1, 0)):
        cudart.enable_peer_access(a, b)
    streams = {g: cudart.stream_create(g) for g in (0, 1)}
    push, pull = BatchedCopy(0), BatchedCopy(1)
    s0, d0 = src.data_ptr(), dst.data_ptr()
    every_other = [(d0 + (2 * i + 1) * PAGE_BYTES, s0 + 2 * i * PAGE_BYTES, PAGE_BYTES)
                   for i in range(NUM_PAGES)]

    def timed(issue: Callable[[], None], stream: Any) -> float:
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        t = time.perf_counter()
        issue()
        cudart.stream_synchronize(stream)
        return time.perf_counter() - t

    def baseline() -> float:
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        t = time.perf_counter()
        dst[:NUM_BYTES].copy_(src[:NUM_BYTES])
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        return time.perf_counter() - t

    def memcpy(g: int, descs: list[tuple[int, int, int]]) -> Callable[[], float]:
        def issue() -> None:
            for d, s, n in descs:
                cudart.copy_async(d, s, n, streams[g])
        return lambda: timed(issue, streams[g])

    def kernel(copier: BatchedCopy, g: int, descs: list[tuple[int, int, int]]
               ) -> Callable[[], float]:
        return lambda: timed(lambda: copier.copy(descs, streams[g]), streams[g])

    one = [(d0, s0, NUM_BYTES)]
    cases: dict[str, tuple[Callable[[], float], list[tuple[int, int, int]]]] = {
        "torch_peer_copy": (baseline, one),
        "memcpy_on_source": (memcpy(0, one), one),
        "memcpy_on_destination": (memcpy(1, one), one),
        "kernel_push": (kernel(push, 0, one), one),
        "kernel_pull": (kernel(pull, 1, one), one),
        "memcpy_on_source_256": (memcpy(0, every_other), every_other),
        "kernel_push_256": (kernel(push, 0, every_other), every_other),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.warmup + args.repeats):
        for name, (once, descs) in cases.items():
            dst.zero_()
            seconds = once()
            torch.cuda.synchronize(1)
            for d, s, n in descs:
                got = dst[d - d0:d - d0 + n]
                if not torch.equal(got, src[s - s0:s - s0 + n].to("cuda:1")):
                    raise AssertionError(f"{name} repetition {rep}: destination differs")
            if rep >= args.warmup:
                samples[name].append(seconds)
    base = statistics.median(samples["torch_peer_copy"])
    results: dict[str, Any] = {}
    for name, values in samples.items():
        med = statistics.median(values)
        results[name] = {"note": CASE_NOTES[name], "median_seconds": med,
                         "min_seconds": min(values), "max_seconds": max(values),
                         "gb_per_s": NUM_BYTES / med / GB, "ratio_vs_baseline": base / med}
    results["gil_free_fraction"] = gil_free_fraction(src[:NUM_BYTES], dst[:NUM_BYTES],
                                                     streams[0])
    push.close()
    pull.close()
    for stream in streams.values():
        cudart.stream_destroy(stream)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench/results/peer_copy-h100.json")
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        print("peer_copy_gpu: needs two CUDA GPUs", file=sys.stderr)
        return 2
    results = run(args)
    doc = {"bench": "peer_copy_gpu", "num_bytes": NUM_BYTES, "page_bytes": PAGE_BYTES,
           "repeats": args.repeats, "warmup": args.warmup, "machine": machine(),
           "cases": results, "unit_gb": GB,
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:<22} {r['median_seconds'] * 1e3:8.3f} ms {r['gb_per_s']:7.1f} GB/s "
                  f"{r['ratio_vs_baseline']:6.3f}x")
        else:
            print(f"{name:<22} {r:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
