"""`tandem gateway` flags: SGLang's router command line, unchanged apart from the program name.

Contract: `load_config(argv)` returns a validated `GatewayConfig` or raises ValueError with one
line naming the flag. Worker URLs are `http://host:port`, `grpc://host:port` or `host:port` of a
worker's gRPC port (the seed's `--prefill http://127.0.0.1:30000` is the prefill worker's
`--port`). `--prefill URL PORT` (SGLang's optional bootstrap port) names the port of the prefill
node's kvd peer service, which otherwise comes from the worker's GetModelInfo. Nothing here
imports torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from services.gateway.policies import POLICY_NAMES

API_KEY_ENV = "TANDEM_API_KEY"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    url: str                     # as given on the command line; the worker's name in logs
    target: str                  # host:port for gRPC
    bootstrap_port: int | None = None  # prefill only: its kvd peer port, when given


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    pd_disaggregation: bool
    prefill: tuple[WorkerSpec, ...]
    decode: tuple[WorkerSpec, ...]
    workers: tuple[WorkerSpec, ...]  # unified (null-mode) workers
    host: str = "127.0.0.1"
    port: int = 8000
    prefill_policy: str = "cache_aware"
    decode_policy: str = "cache_aware"
    worker_policy: str = "cache_aware"
    policy_options: dict[str, float] = field(default_factory=dict)
    api_key: str | None = None
    health_check_interval_s: float = 5.0
    health_check_timeout_s: float = 5.0
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    request_timeout_s: float = 1800.0
    max_retries: int = 3            # extra attempts for a request that streamed nothing yet
    max_payload_bytes: int = 256 * 1024 * 1024
    log_level: str = "info"


def parse_worker_url(url: str, bootstrap_port: str | None = None) -> WorkerSpec:
    """`http://h:p`, `grpc://h:p` or `h:p` -> WorkerSpec; ValueError says what is wrong."""
    raw = url if "://" in url else f"grpc://{url}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "grpc", "https", "grpcs"):
        raise ValueError(f"worker URL {url!r}: scheme must be http:// or grpc://")
    if parts.scheme in ("https", "grpcs"):
        raise ValueError(f"worker URL {url!r}: TLS to workers is not supported; use http:// or "
                         "grpc:// (the workers' gRPC port)")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ValueError(f"worker URL {url!r} must be scheme://host:port of the worker's gRPC port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    bootstrap = None
    if bootstrap_port is not None:
        if not bootstrap_port.isdigit() or not 0 < int(bootstrap_port) < 65536:
            raise ValueError(f"--prefill {url} {bootstrap_port}: the bootstrap port must be a "
                             "port number")
        bootstrap = int(bootstrap_port)
    return WorkerSpec(url=url, target=f"{host}:{port}", bootstrap_port=bootstrap)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tandem gateway",
        description="OpenAI-compatible HTTP gateway and prefill/decode router")
    p.add_argument("--pd-disaggregation", action="store_true",
                   help="route each request to a prefill and a decode worker")
    p.add_argument("--prefill", action="append", nargs="+", default=[], metavar="URL [PORT]",
                   help="a prefill worker's gRPC URL, optionally its kvd peer (bootstrap) port")
    p.add_argument("--decode", action="append", default=[], metavar="URL",
                   help="a decode worker's gRPC URL")
    p.add_argument("--worker", "--worker-urls", dest="worker", action="append", nargs="+",
                   default=[], metavar="URL", help="a unified worker's gRPC URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--policy", choices=POLICY_NAMES, default="cache_aware",
                   help="routing policy for every role without its own")
    p.add_argument("--prefill-policy", choices=POLICY_NAMES)
    p.add_argument("--decode-policy", choices=POLICY_NAMES)
    p.add_argument("--cache-threshold", type=float, default=0.5)
    p.add_argument("--balance-abs-threshold", type=float, default=32)
    p.add_argument("--balance-rel-threshold", type=float, default=1.0001)
    p.add_argument("--eviction-interval-secs", type=float, default=60.0)
    p.add_argument("--max-tree-size", type=int, default=2**24)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    p.add_argument("--health-check-interval-secs", type=float, default=5.0)
    p.add_argument("--health-check-timeout-secs", type=float, default=5.0)
    p.add_argument("--health-failure-threshold", type=int, default=3)
    p.add_argument("--health-success-threshold", type=int, default=2)
    p.add_argument("--request-timeout-secs", type=float, default=1800.0)
    p.add_argument("--retry-max-retries", type=int, default=3,
                   help="extra attempts for a request whose legs failed before its first token")
    p.add_argument("--max-payload-size", type=int, default=256 * 1024 * 1024)
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error", "critical"))
    return p


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, caller decides the exit
        raise _ArgumentError(message)


def load_config(argv: list[str]) -> GatewayConfig:
    parser = build_parser()
    parser.__class__ = _Parser
    try:
        a = parser.parse_args(argv)
    except _ArgumentError as e:
        raise ValueError(str(e)) from None
    prefill = []
    for values in a.prefill:
        if len(values) > 2:
            raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(values)}")
        prefill.append(parse_worker_url(*values))
    decode = [parse_worker_url(u) for u in a.decode]
    workers = [parse_worker_url(u) for group in a.worker for u in group]
    if a.pd_disaggregation:
        if not prefill or not decode:
            raise ValueError("--pd-disaggregation needs at least one --prefill and one --decode")
        if workers:
            raise ValueError("--worker is for unified workers; with --pd-disaggregation give "
                             "--prefill and --decode")
    else:
        if prefill or decode:
            raise ValueError("--prefill/--decode need --pd-disaggregation")
        if not workers:
            raise ValueError("give --worker URL (unified workers), or --pd-disaggregation with "
                             "--prefill URL and --decode URL")
    for role, specs in (("--prefill", prefill), ("--decode", decode), ("--worker", workers)):
        seen = [s.target for s in specs]
        if len(set(seen)) != len(seen):
            raise ValueError(f"{role}: the same worker is listed twice")
    checks = [("--port", 0 <= a.port < 65536), ("--cache-threshold", 0 <= a.cache_threshold <= 1),
              ("--health-check-interval-secs", a.health_check_interval_secs > 0),
              ("--health-check-timeout-secs", a.health_check_timeout_secs > 0),
              ("--health-failure-threshold", a.health_failure_threshold >= 1),
              ("--health-success-threshold", a.health_success_threshold >= 1),
              ("--request-timeout-secs", a.request_timeout_secs > 0),
              ("--retry-max-retries", a.retry_max_retries >= 0),
              ("--max-tree-size", a.max_tree_size > 0),
              ("--max-payload-size", a.max_payload_size > 0)]
    for flag, ok in checks:
        if not ok:
            raise ValueError(f"{flag}: value out of range")
    return GatewayConfig(
        pd_disaggregation=a.pd_disaggregation, prefill=tuple(prefill), decode=tuple(decode),
        workers=tuple(workers), host=a.host, port=a.port,
        prefill_policy=a.prefill_policy or a.policy, decode_policy=a.decode_policy or a.policy,
        worker_policy=a.policy,
        policy_options={"cache_threshold": a.cache_threshold,
                        "balance_abs_threshold": a.balance_abs_threshold,
                        "balance_rel_threshold": a.balance_rel_threshold,
                        "eviction_interval_s": a.eviction_interval_secs,
                        "max_tree_size": a.max_tree_size},
        api_key=a.api_key, health_check_interval_s=a.health_check_interval_secs,
        health_check_timeout_s=a.health_check_timeout_secs,
        health_failure_threshold=a.health_failure_threshold,
        health_success_threshold=a.health_success_threshold,
        request_timeout_s=a.request_timeout_secs, max_retries=a.retry_max_retries,
        max_payload_bytes=a.max_payload_size, log_level=a.log_level)
