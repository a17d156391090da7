"""The life of a worker's gRPC server: bind, serve, drain on SIGTERM/SIGINT.

`bind` / `bind_address` are also how kvd binds its two servers: one place turns grpcio's
"cannot bind" (0, or RuntimeError in newer grpcio) into an OSError naming the flags.

Contract: `serve_until_signal` binds `host:port` (OSError naming the flags when it cannot),
starts the server, prints one "serving ..." line, and on SIGTERM/SIGINT turns health
NOT_SERVING, refuses new RPCs, lets live ones finish for up to `grace` seconds, then awaits
`on_stopped` (the worker stops its engine there). Returns the exit status.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health

logger = logging.getLogger(__name__)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    address = f"[{host}]" if ":" in host else host
    return bind_address(server, f"{address}:{port}", f"--host {host} --port {port}")


def bind_address(server: grpc.aio.Server, address: str, flags: str) -> int:
    """The port bound at `address` (host:port or unix:path); OSError naming `flags`, the
    options that chose it, when it cannot be (grpcio >= 1.8x raises where older ones gave 0)."""
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"{flags}: cannot listen on {address} (in use?)")
    return bound


async def serve_until_signal(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer,
                             banner: str, grace: float, live_count: Callable[[], int],
                             on_stopped: Callable[[], Awaitable[None]]) -> int:
    await server.start()
    print(banner, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down: draining %d live request(s) for up to %.0f s", live_count(),
                grace)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace)
    await on_stopped()
    logger.info("stopped")
    return 0
