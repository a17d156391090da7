"""Processes for benchmarks: start, wait until healthy, stop. (Benchmarks do not import tests.)

Contract: `start` runs `python ARGS` with output to a log file; the child gets SIGKILL if the
benchmark dies. `wait_grpc` / `wait_http` return once the target answers healthy, raising with
the log's tail if the process exited or `timeout` passed. `stop` sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import services  # noqa: F401  (gRPC's settings, before grpc loads: see services/__init__.py)

# isort: split
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.process import parent_death

# Ports handed out are below Linux's ephemeral range (32768-60999 by default): a port the kernel
# picked with bind(0) was free at that moment, but until the server binds it any outgoing
# connection may take it as its source port ("Address already in use": a kvd of this suite
# failed to start so once). Each is handed out once per process.
_PORTS = range(20000, 32768)
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and outside the ephemeral range."""
    for _ in range(200):
        port = random.choice(_PORTS)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})},
                                preexec_fn=parent_death(signal.SIGKILL))


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-1500:]
    except OSError:
        return ""


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not healthy within {timeout}s:\n{_tail(log)}")
        time.sleep(0.1)


def wait_grpc(target: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    def ready() -> bool:
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2.0)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    _wait(ready, proc, log, target, timeout)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    def ready() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
    _wait(ready, proc, log, url, timeout)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
