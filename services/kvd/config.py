"""kvd's configuration: flags, and the seed's environment variables with their defaults.

Every `SGLANG_DISAGGREGATION_*` variable keeps SGLang's name, meaning and default
(seed/pd_disaggregation.md); a malformed value is a start-up error naming the variable.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field


def default_thread_pool_size() -> int:
    """SGLang's default: int(0.75 * cpu_count) // 8, held within [4, 12]."""
    return min(max(int(0.75 * (os.cpu_count() or 1)) // 8, 4), 12)


def _env(name: str, default: float, kind: type, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be >= {minimum}")
    return value


@dataclass(frozen=True, slots=True)
class TransferSettings:
    """The seed's environment variables, read once at start."""

    thread_pool_size: int = field(default_factory=default_thread_pool_size)
    queue_size: int = 4
    bootstrap_timeout: float = 300.0
    waiting_timeout: float = 300.0
    heartbeat_interval: float = 5.0
    heartbeat_max_failure: int = 2

    @classmethod
    def from_env(cls) -> TransferSettings:
        return cls(
            thread_pool_size=int(_env("SGLANG_DISAGGREGATION_THREAD_POOL_SIZE",
                                      default_thread_pool_size(), int, 1)),
            queue_size=int(_env("SGLANG_DISAGGREGATION_QUEUE_SIZE", 4, int, 1)),
            bootstrap_timeout=_env("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300.0, float, 0.0),
            waiting_timeout=_env("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", 300.0, float, 0.0),
            heartbeat_interval=_env("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL", 5.0, float, 0.01),
            heartbeat_max_failure=int(_env("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE",
                                           2, int, 1)),
        )


def default_socket_path() -> str:
    return f"/tmp/tandem-kvd-{os.getuid()}.sock"


@dataclass(frozen=True, slots=True)
class KvdConfig:
    host: str = "127.0.0.1"  # address peers reach this kvd at (and the peer port binds to)
    port: int = 17000  # TCP port of the peer service
    socket: str = field(default_factory=default_socket_path)  # unix socket for local workers
    backend: str = "mooncake"  # --disaggregation-transfer-backend
    ib_device: str | None = None  # --disaggregation-ib-device
    metrics_port: int = 0  # Prometheus /metrics over HTTP on --host; 0: any free port, -1: off
    settings: TransferSettings = field(default_factory=TransferSettings.from_env)

    @property
    def peer_address(self) -> str:
        return f"{self.host}:{self.port}"


def build_parser() -> argparse.ArgumentParser:
    d = KvdConfig(settings=TransferSettings())
    p = argparse.ArgumentParser(prog="tandem kvd",
                                description="the per-node KV daemon: owns KV pools, moves KV")
    p.add_argument("--host", default=d.host, help="address peer kvds reach this one at")
    p.add_argument("--port", type=int, default=d.port, help="TCP port of the peer service")
    p.add_argument("--socket", default=d.socket, help="unix socket for this node's workers")
    p.add_argument("--disaggregation-transfer-backend", "--backend", dest="backend",
                   default=d.backend, choices=("nixl", "mooncake", "ascend"))
    p.add_argument("--disaggregation-ib-device", "--ib-device", dest="ib_device",
                   default=d.ib_device)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port,
                   help="HTTP port of Prometheus /metrics on --host (0: any free port, "
                        "reported by Stats; -1: off)")
    return p


def parse_args(argv: list[str]) -> KvdConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if not -1 <= a.metrics_port <= 65535:
        p.error(f"--metrics-port must be in [-1, 65535], got {a.metrics_port}")
    return KvdConfig(host=a.host, port=a.port, socket=a.socket, backend=a.backend,
                     ib_device=a.ib_device, metrics_port=a.metrics_port,
                     settings=TransferSettings.from_env())
