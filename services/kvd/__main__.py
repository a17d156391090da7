"""`tandem kvd` / `python -m services.kvd`: run the node's KV daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from services.common.process import freeze_gc
from services.common.tracing import setup_tracing
from services.kvd.backends.base import BackendUnavailable
from services.kvd.config import parse_args
from services.kvd.server import KvdServer

logger = logging.getLogger("services.kvd")


async def _serve(server: KvdServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    freeze_gc()
    await stop.wait()
    logger.info("kvd stopping")
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s kvd[{os.getpid()}] %(levelname)s %(name)s: "
                               "%(message)s")
    setup_tracing("tandem-kvd")
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        server = KvdServer(config)
    except (ValueError, BackendUnavailable) as e:
        print(f"tandem kvd: error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(server))
    except OSError as e:
        print(f"tandem kvd: error: {e}", file=sys.stderr)
        code = 2
    else:
        code = 0
    try:
        server.close_memory()
    finally:
        # UCX's ib module crashes a process that created a backend at interpreter exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
