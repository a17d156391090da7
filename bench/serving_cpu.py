"""Serving on this CPU: 1 prefill + 1 decode worker (PD) against 2 unified workers, same load.

    .venv/bin/python -m bench.serving_cpu [--num-prompts 48 --request-rate 0.6]
                                          [--out bench/results/serving_cpu.json]

Both deployments run the embedded model (fp32) in two worker processes pinned to one thread
each (OMP_NUM_THREADS=1): the same two worker processes' worth of CPU. They run one after the
other, each behind its own `tandem gateway`, and get the same `tandem bench` workload: random
prompts and output lengths, Poisson arrivals, chat completions, streamed. Reported per
deployment: TTFT, ITL, TPOT, E2E (mean, p50, p90, p99), throughput and goodput under the SLOs;
and PD / unified ratios.

The gateway's added latency is measured on each deployment before its load run: a 1-token
completion through the gateway (HTTP, non-streamed) against the same request sent straight to
the workers' gRPC (unified: Generate on the worker; PD: both legs, as the gateway sends them),
alternating, sequentially, persistent connections on both paths (a raw HTTP/1.1 client, so
that an HTTP library's own cost is not counted as the gateway's). Added latency = gateway minus
direct, at p50 and p99 (goal: p50 <= 2 ms), and the median of adjacent pairs' differences
(less sensitive to the ~90 ms forward pass's own jitter, which both paths include). Results,
with the machine named, go to `bench/results/serving_cpu.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import httpx

from bench.procs import free_port, start, stop, wait_grpc, wait_http
from services.bench.report import machine_info, percentile
from services.common.proto.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.router import with_room

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Deployment:
    """Worker processes and a gateway; `close` stops them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs = []
        self.workers: dict[str, list[str]] = {}
        self.metrics: dict[str, str] = {}  # /metrics URLs of workers, by a name the caller picks

    def worker(self, mode: str, extra: list[str]) -> str:
        port = free_port()
        log = self.tmp / f"{mode}-{port}.log"
        proc = start(["-m", "services.cli", "serve", "--disaggregation-mode", mode, "--port",
                      str(port), *extra], log, ONE_THREAD)
        self.procs.append(proc)
        wait_grpc(f"127.0.0.1:{port}", proc, log)
        self.workers.setdefault(mode, []).append(f"127.0.0.1:{port}")
        return f"127.0.0.1:{port}"

    def kvd(self, backend: str) -> list[str]:
        """Start this node's kvd (here, so that it stops with the deployment); the flags that
        point a worker at it."""
        sock, port = str(self.tmp / "kvd.sock"), free_port()
        log = self.tmp / "kvd.log"
        proc = start(["-m", "services.cli", "kvd", "--socket", sock, "--port", str(port),
                      "--backend", backend], log)
        self.procs.append(proc)
        wait_grpc(f"unix:{sock}", proc, log)
        return ["--kvd-socket", sock, "--kvd-port", str(port),
                "--disaggregation-transfer-backend", backend]

    def gateway(self, args: list[str]) -> str:
        port = free_port()
        log = self.tmp / f"gateway-{port}.log"
        proc = start(["-m", "services.cli", "gateway", *args, "--port", str(port)], log)
        self.procs.append(proc)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/health", proc, log)
        return self.url

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def pd_deployment(tmp: Path, backend: str) -> Deployment:
    """One node: its kvd (started here, so that it stops with the deployment), prefill and
    decode workers, a PD gateway."""
    d = Deployment(tmp)
    node = d.kvd(backend)
    prefill = d.worker("prefill", node)
    decode = d.worker("decode", node)
    d.gateway(["--pd-disaggregation", "--prefill", f"http://{prefill}",
               "--decode", f"http://{decode}"])
    return d


def unified_deployment(tmp: Path) -> Deployment:
    d = Deployment(tmp)
    workers = [d.worker("null", []), d.worker("null", [])]
    d.gateway(["--worker", *[f"http://{w}" for w in workers], "--policy", "power_of_two"])
    return d


# ---- gateway overhead ----

PROMPT = "Say hi."


class RawHttp:
    """One persistent HTTP/1.1 connection with next to no client-side cost, so that the
    gateway's share is measured rather than an HTTP library's (httpx costs ~0.5 ms a call
    here; the direct path's gRPC client is the same on both sides of the comparison)."""

    def __init__(self, url: str) -> None:
        self.host, self.port = url.removeprefix("http://").rsplit(":", 1)

    async def __aenter__(self) -> RawHttp:
        self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def post(self, path: str, body: bytes) -> bytes:
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(),
                                                             len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        payload = await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {payload[:200]!r}")
        return payload


async def _overhead(d: Deployment, pd: bool, samples: int
                    ) -> tuple[list[float], list[float], list[float]]:
    """(via gateway, direct, via gateway with httpx) seconds of sequential 1-token requests,
    in turn; persistent connections on every path, 5 warm-up rounds dropped."""
    request = worker_pb2.GenerateRequest(
        text=PROMPT, sampling=worker_pb2.SamplingParams(max_tokens=1, temperature=0))
    if pd:
        prefill, decode = d.workers["prefill"][0], d.workers["decode"][0]
    else:
        prefill, decode = None, d.workers["null"][0]
    body = json.dumps({"model": _model(d.url), "prompt": PROMPT, "max_tokens": 1,
                       "temperature": 0}).encode()
    via_gateway, direct, via_httpx = [], [], []
    async with RawHttp(d.url) as http, httpx.AsyncClient(timeout=60) as client, \
            grpc.aio.insecure_channel(decode) as dch, \
            grpc.aio.insecure_channel(prefill or decode) as pch:
        d_stub = worker_pb2_grpc.GenerateServiceStub(dch)
        p_stub = worker_pb2_grpc.PrefillServiceStub(pch)
        if pd:  # where the legs' kvds are, as the gateway learns it
            p_kvd = (await p_stub.GetModelInfo(worker_pb2.ModelInfoRequest())).kvd_peer_address
            d_kvd = (await d_stub.GetModelInfo(worker_pb2.ModelInfoRequest())).kvd_peer_address

        async def decode_leg(r: worker_pb2.GenerateRequest) -> None:
            async for _ in d_stub.Generate(r, timeout=60):
                pass

        for i in range(samples + 5):
            started = time.perf_counter()
            if pd:
                room = uuid.uuid4().hex
                await asyncio.gather(
                    decode_leg(with_room(request, room, p_kvd)),
                    p_stub.Prefill(worker_pb2.PrefillRequest(
                        request=with_room(request, room, d_kvd)), timeout=60))
            else:
                await decode_leg(request)
            t_direct = time.perf_counter() - started
            started = time.perf_counter()
            await http.post("/v1/completions", body)
            t_gateway = time.perf_counter() - started
            started = time.perf_counter()
            (await client.post(f"{d.url}/v1/completions", content=body,
                               headers={"Content-Type": "application/json"})).raise_for_status()
            t_httpx = time.perf_counter() - started
            if i >= 5:
                direct.append(t_direct)
                via_gateway.append(t_gateway)
                via_httpx.append(t_httpx)
    return via_gateway, direct, via_httpx


def gateway_overhead(d: Deployment, pd: bool, samples: int) -> dict:
    return _overhead_stats(*asyncio.run(_overhead(d, pd, samples)))


def _overhead_stats(via_gateway: list[float], direct: list[float],
                    via_httpx: list[float]) -> dict:
    q = percentile  # the same percentile as every `tandem bench` report
    g50, g99, d50, d99 = (q(via_gateway, 50), q(via_gateway, 99), q(direct, 50), q(direct, 99))
    return {"samples": len(direct),
            "gateway_ms": {"p50": g50 * 1e3, "p99": g99 * 1e3,
                           "mean": statistics.fmean(via_gateway) * 1e3},
            "direct_grpc_ms": {"p50": d50 * 1e3, "p99": d99 * 1e3,
                               "mean": statistics.fmean(direct) * 1e3},
            # the same gateway through httpx (the openai SDK's HTTP client): client-side cost
            "gateway_with_httpx_client_ms": {"p50": q(via_httpx, 50) * 1e3,
                                             "p99": q(via_httpx, 99) * 1e3},
            "added_ms": {"p50": (g50 - d50) * 1e3, "p99": (g99 - d99) * 1e3,
                         # robust to drift: median of (gateway - direct) over adjacent pairs
                         "paired_median": statistics.median(
                             g - d for g, d in zip(via_gateway, direct, strict=True)) * 1e3},
            "goal_added_p50_ms": 2.0, "met": (g50 - d50) * 1e3 <= 2.0}


def _model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


# ---- load ----

def run_load(d: Deployment, args: argparse.Namespace, tmp: Path, name: str) -> dict:
    out = tmp / f"bench-{name}.json"
    cmd = ["-m", "services.cli", "bench", "--base-url", d.url, "--backend", "openai-chat",
           "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--random-range-ratio",
           str(args.range_ratio), "--request-rate", str(args.request_rate),
           "--seed", str(args.seed),
           "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-itl-ms", str(args.slo_itl_ms),
           "--disable-tqdm", "--output-json", str(out)]
    log = tmp / f"bench-{name}.log"
    proc = start(cmd, log)
    code = proc.wait()
    print(log.read_text(errors="replace"))
    if code != 0 or not out.exists():
        raise RuntimeError(f"tandem bench ({name}) exited with {code}")
    report = json.loads(out.read_text())
    return {k: v for k, v in report.items() if k not in ("requests", "machine")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.25)
    p.add_argument("--request-rate", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=1, help="tandem bench's workload seed")
    p.add_argument("--slo-ttft-ms", type=float, default=4000)
    p.add_argument("--slo-itl-ms", type=float, default=150)
    p.add_argument("--overhead-samples", type=int, default=300)
    p.add_argument("--backend", default="mooncake", choices=("mooncake", "nixl"))
    p.add_argument("--out", default="bench/results/serving_cpu.json")
    args = p.parse_args()
    results: dict = {"machine": machine_info(), "load_avg_at_start": os.getloadavg(),
                     "config": vars(args), "worker_threads": 1}
    with tempfile.TemporaryDirectory(prefix="tandem-serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for name, make in (("pd_1p1d", lambda: pd_deployment(tmp, args.backend)),
                           ("unified_2x", lambda: unified_deployment(tmp))):
            d = make()
            try:
                results[name] = {
                    "gateway_overhead": gateway_overhead(d, name.startswith("pd"),
                                                         args.overhead_samples),
                    "load": run_load(d, args, tmp, name)}
            finally:
                d.close()
    pd, uni = results["pd_1p1d"]["load"]["summary"], results["unified_2x"]["load"]["summary"]
    results["pd_over_unified"] = _ratios(pd, uni)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("pd_over_unified",)}, indent=2))
    print(json.dumps({n: results[n]["gateway_overhead"]["added_ms"]
                      for n in ("pd_1p1d", "unified_2x")}, indent=2))
    return 0


def _ratios(pd: dict, uni: dict) -> dict:
    out = {}
    for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        for q in ("p50", "p99"):
            a, b = pd.get(metric, {}).get(q), uni.get(metric, {}).get(q)
            if a is not None and b:
                out[f"{metric}_{q}"] = a / b
    # goodput is good requests per second of the run (first arrival to last completion): with
    # every request good on both sides its ratio is the runs' durations; num_good says so
    for metric in ("goodput", "num_good", "request_throughput", "output_throughput"):
        a, b = pd.get(metric), uni.get(metric)
        if a is not None and b:
            out[metric] = a / b
    return out


if __name__ == "__main__":
    raise SystemExit(main())
