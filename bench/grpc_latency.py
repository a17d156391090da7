"""The floor of Tandem's control plane: one small unary gRPC call between two Python
processes, as the workers call kvd and kvds call each other (grpc.aio on both sides).

    python -m bench.grpc_latency [--calls 2000] [--rounds 3]
        [--out bench/results/grpc_latency-cpu.json]

A server process (grpc.aio, the health service) and a client process (grpc.aio stub) are
started; the client makes `--calls` calls over a unix socket and over TCP loopback after 100
warm-up calls, and reports the median and p90 round trip in microseconds. A room's KV path has
several such calls in series (SendKv, the decode side's notification, ExpectKv's answer), so
this bounds how close a transfer's end-to-end time can come to the copy alone.

Two settings alternate for `--rounds` rounds (result: median over rounds): `default` (gRPC as
installed) and `no_event_engine` (GRPC_EXPERIMENTS turning off the EventEngine client, listener
and callback-CQ paths, which made a SYNC server answer about a third faster in a probe; the
ratio default / no_event_engine says whether it helps the aio stack Tandem uses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import free_port

SETTINGS = {"default": None,
            "no_event_engine": "-event_engine_client,-event_engine_listener,"
                               "-event_engine_callback_cq"}


def serve(address: str) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    async def main() -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def call(address: str, calls: int) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def main() -> list[float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=30, wait_for_ready=True)
            for _ in range(100):
                await stub.Check(health_pb2.HealthCheckRequest())
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest())
                times.append(time.perf_counter() - t)
            return times

    times = sorted(asyncio.run(main()))
    print(json.dumps({"p50_us": times[len(times) // 2] * 1e6,
                      "p90_us": times[int(len(times) * 0.9)] * 1e6}))


def measure(setting: str, address: str, calls: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if SETTINGS[setting] is not None:
        env["GRPC_EXPERIMENTS"] = SETTINGS[setting]
    me = [sys.executable, "-m", "bench.grpc_latency"]
    server = subprocess.Popen([*me, "--serve", address], env=env)
    try:
        out = subprocess.run([*me, "--call", address, "--calls", str(calls)], env=env,
                             capture_output=True, text=True, timeout=300, check=True).stdout
    finally:
        server.kill()
        server.wait()
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench/results/grpc_latency-cpu.json")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--call", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.call:
        call(args.call, args.calls)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="grpc-latency-"))
    samples: dict[str, dict[str, list[dict[str, float]]]] = {
        s: {"unix": [], "tcp": []} for s in SETTINGS}
    for rnd in range(args.rounds):
        for setting in SETTINGS:
            port = free_port()
            for transport, address in (("unix", f"unix:{tmp}/{setting}-{rnd}.sock"),
                                       ("tcp", f"127.0.0.1:{port}")):
                samples[setting][transport].append(measure(setting, address, args.calls))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for setting, by_transport in samples.items():
        results[setting] = {t: {k: statistics.median(r[k] for r in rounds)
                                for k in ("p50_us", "p90_us")}
                            for t, rounds in by_transport.items()}
    ratios = {t: results["default"][t]["p50_us"] / results["no_event_engine"][t]["p50_us"]
              for t in ("unix", "tcp")}
    try:
        from importlib.metadata import version
        grpc_version = version("grpcio")
    except Exception:  # noqa: BLE001 - reported, not needed
        grpc_version = None
    doc = {"bench": "grpc_latency", "calls": args.calls, "rounds": args.rounds,
           "settings": SETTINGS, "results_us": results,
           "p50_ratio_default_over_no_event_engine": ratios,
           "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform(), "grpcio": grpc_version},
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for setting, by_transport in results.items():
        for transport, r in by_transport.items():
            print(f"{setting:<15} {transport:<5} p50 {r['p50_us']:7.0f} us  "
                  f"p90 {r['p90_us']:7.0f} us")
    print(f"p50 ratio default/no_event_engine: unix {ratios['unix']:.2f}  tcp {ratios['tcp']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
