"""`tandem gateway` / `python -m services.gateway`: serve the HTTP API until SIGTERM/SIGINT.

A bad flag exits 2 with one line on stderr. The gateway starts serving at once; requests get 503
until each role has a worker in rotation (`/health` says which role is missing).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import sys

import uvicorn

from services.common.process import freeze_gc
from services.common.tracing import setup_tracing
from services.gateway.app import build_app
from services.gateway.config import GatewayConfig, load_config
from services.gateway.metrics import GatewayMetrics
from services.gateway.policies import make_policy
from services.gateway.router import Router
from services.gateway.workers import HealthChecker, WorkerGroup


def _policy(name: str, options: dict[str, float]):
    return make_policy(name, **options) if name == "cache_aware" else make_policy(name)


async def serve(config: GatewayConfig) -> int:
    if config.pd_disaggregation:
        groups = {"prefill": WorkerGroup("prefill", config.prefill),
                  "decode": WorkerGroup("decode", config.decode)}
        policies = {"prefill": _policy(config.prefill_policy, config.policy_options),
                    "decode": _policy(config.decode_policy, config.policy_options)}
    else:
        groups = {"worker": WorkerGroup("worker", config.workers)}
        policies = {"worker": _policy(config.worker_policy, config.policy_options)}
    metrics = GatewayMetrics(lambda: [w for g in groups.values() for w in g.workers])
    router = Router(groups, policies, metrics, pd=config.pd_disaggregation,
                    request_timeout_s=config.request_timeout_s, max_retries=config.max_retries,
                    check_timeout_s=config.health_check_timeout_s)
    checker = HealthChecker(groups.values(), config.health_check_interval_s,
                            config.health_check_timeout_s, config.health_success_threshold,
                            config.health_failure_threshold)
    app = build_app(router, metrics, config.api_key, config.max_payload_bytes)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level,
        access_log=False, timeout_graceful_shutdown=30, lifespan="off",
        http="httptools" if _has("httptools") else "h11"))
    try:
        sock = _listen(config.host, config.port)
    except OSError as e:
        print(f"tandem gateway: error: --host {config.host} --port {config.port}: cannot listen "
              f"there ({e.strerror or e})", file=sys.stderr)
        return 2
    checker.start()
    freeze_gc()
    mode = "PD" if config.pd_disaggregation else "unified"
    counts = ", ".join(f"{len(g.workers)} {role}" for role, g in groups.items())
    print(f"gateway ({mode}: {counts}) on http://{config.host}:{config.port}", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        await checker.stop()
        for group in groups.values():
            for worker in group.workers:
                await worker.close()
    return 0


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: one owner
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"tandem gateway: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s gateway[{os.getpid()}] %(levelname)s %(name)s: "
                               "%(message)s")
    setup_tracing("tandem-gateway")
    if _has("uvloop"):  # a faster event loop; grpc.aio runs on it
        import uvloop
        return uvloop.run(serve(config))
    return asyncio.run(serve(config))


if __name__ == "__main__":
    raise SystemExit(main())
