"""`tandem profile start|stop`: the torch profiler on workers, through a gateway or directly.

    tandem profile start --gateway http://127.0.0.1:8000 --role decode [--output-dir DIR]
    tandem profile stop  --gateway http://127.0.0.1:8000 --role decode
    tandem profile start --worker 127.0.0.1:30000          # a worker's gRPC port, no gateway

Prints one line per worker (its trace file on stop). Exit 0 when every worker did it, 1 when
any refused or could not be reached (its reason printed), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
import httpx

from services.common.proto.tandem.v1 import profiler_pb2, profiler_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem profile", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("start", "stop"))
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gateway", help="the gateway's base URL")
    where.add_argument("--worker", action="append", help="a worker's gRPC host:port (repeatable)")
    p.add_argument("--role", default="all", help="with --gateway: prefill, decode, worker, all")
    p.add_argument("--url", help="with --gateway: one worker, as the gateway names it")
    p.add_argument("--output-dir", default="", help="where traces go (default: the worker's "
                   "$SGLANG_TORCH_PROFILER_DIR or /tmp)")
    p.add_argument("--record-shapes", action="store_true")
    p.add_argument("--with-stack", action="store_true")
    p.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"))
    return p


def _via_gateway(a: argparse.Namespace) -> int:
    body: dict = {"role": a.role}
    if a.url:
        body["url"] = a.url
    if a.action == "start":
        body.update(output_dir=a.output_dir, record_shapes=a.record_shapes,
                    with_stack=a.with_stack)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    try:
        r = httpx.post(f"{a.gateway.rstrip('/')}/{a.action}_profile", json=body,
                       headers=headers, timeout=180)
    except httpx.HTTPError as e:
        print(f"tandem profile: {a.gateway}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"tandem profile: HTTP {r.status_code}: {r.json()['error']['message']}",
              file=sys.stderr)
        return 1
    for w in r.json()["workers"]:
        done = w.get("trace_path") or f"profiling into {w['output_dir']}"
        print(f"{w['role']} {w['url']}: {done}")
    return 0


def _direct(a: argparse.Namespace) -> int:
    failed = 0
    for target in a.worker:
        with grpc.insecure_channel(target) as channel:
            stub = profiler_pb2_grpc.ProfilerServiceStub(channel)
            try:
                if a.action == "start":
                    reply = stub.StartProfile(profiler_pb2.StartProfileRequest(
                        output_dir=a.output_dir, record_shapes=a.record_shapes,
                        with_stack=a.with_stack), timeout=180)
                    print(f"{target}: profiling into {reply.output_dir}")
                else:
                    reply = stub.StopProfile(profiler_pb2.StopProfileRequest(), timeout=180)
                    print(f"{target}: {reply.trace_path} ({reply.seconds:.1f} s)")
            except grpc.RpcError as e:
                print(f"tandem profile: {target}: {e.code().name}: {e.details()}",
                      file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return _via_gateway(a) if a.gateway else _direct(a)


if __name__ == "__main__":
    raise SystemExit(main())
