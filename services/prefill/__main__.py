"""`tandem serve --disaggregation-mode prefill` / `python -m services.prefill`: run a prefill
worker until SIGTERM/SIGINT. A bad flag exits 2 with one line on stderr, no traceback."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from services.common.tracing import setup_tracing
from services.prefill.config import load_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"tandem serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s prefill[{os.getpid()}] %(levelname)s %(name)s: "
                               "%(message)s")
    setup_tracing("tandem-prefill")
    for note in config.notes():
        logging.getLogger("services.prefill").warning("%s", note)
    from services.prefill.server import PrefillWorker  # imports torch: once the flags are good

    try:
        return asyncio.run(PrefillWorker(config).serve())
    except (ValueError, OSError, RuntimeError) as e:
        print(f"tandem serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
