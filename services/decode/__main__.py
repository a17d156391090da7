"""`tandem serve` (null and decode modes) / `python -m services.decode`: run a worker until
SIGTERM/SIGINT. A bad flag or model path exits 2 with one line on stderr, no traceback."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from services.common.tracing import setup_tracing
from services.decode.config import load_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"tandem serve: error: {e}", file=sys.stderr)
        return 2
    service = "unified" if config.disaggregation_mode == "null" else config.disaggregation_mode
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s {service}[{os.getpid()}] %(levelname)s %(name)s: "
                               "%(message)s")
    setup_tracing(f"tandem-{service}")
    for note in config.notes():
        logging.getLogger("services.decode").warning("%s", note)
    # imports torch: only once the flags are good
    from services.decode.server import Worker

    worker_class: type[Worker] = Worker
    if config.disaggregation_mode == "decode":
        from services.decode.pd import DecodeWorker

        worker_class = DecodeWorker
    try:
        worker = worker_class(config)
        return asyncio.run(worker.serve())
    except (ValueError, OSError, RuntimeError) as e:
        print(f"tandem serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
