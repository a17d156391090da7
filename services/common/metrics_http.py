"""Serve one process's Prometheus registry at `/metrics` over HTTP, next to its gRPC servers.

Contract: `start_metrics_server(registry, host, port, what)` binds `host:port` (0: any free
port; -1: off), serves on a daemon thread (prometheus_client's threaded server), logs the
address and returns a `MetricsEndpoint` whose `address` is `host:port` ("" when off), for
GetModelInfo / Stats to report. OSError naming `--metrics-port` when it cannot bind. No
torch: kvd uses it too.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)

METRICS_OFF = -1


class MetricsEndpoint:
    def __init__(self, address: str = "", server: Any = None) -> None:
        self.address = address  # host:port; "" when off
        self._server = server

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_metrics_server(registry: CollectorRegistry, host: str, port: int,
                         what: str) -> MetricsEndpoint:
    if port == METRICS_OFF:
        logger.info("%s: metrics off (--metrics-port -1)", what)
        return MetricsEndpoint()
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(f"--host {host} --metrics-port {port}: cannot listen there: {e}") from None
    address = f"[{host}]:{server.server_port}" if ":" in host else f"{host}:{server.server_port}"
    logger.info("%s: metrics at http://%s/metrics", what, address)
    return MetricsEndpoint(address, server)
