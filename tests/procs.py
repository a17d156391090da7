"""Real processes for integration tests: free ports, start, wait for health, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.procs import free_port  # one definition: see there why ports are picked so

# UCX's ib module crashes processes that created a UCX backend at exit (DESIGN.md).
CHILD_ENV = {"UCX_MODULES": "^ib", "PYTHONUNBUFFERED": "1"}


def wait_healthy(target: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Block until `target` answers SERVING; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if target.startswith("unix:") and not os.path.exists(target[5:]):
            time.sleep(0.05)
            continue
        # a fresh channel each try: a failed one backs off for seconds before retrying
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=False)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"{target} not healthy within {timeout}s")


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, **CHILD_ENV, **(env or {})})


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout)


def start_kvd(tmp: Path, name: str, backend: str = "nixl", host: str = "127.0.0.1",
              env: dict[str, str] | None = None, netns: str | None = None):
    """A kvd process; returns (proc, socket path, peer address)."""
    return start_kvd_at(tmp, name, free_port(), backend, host, env, netns)


def start_kvd_at(tmp: Path, name: str, port: int, backend: str = "nixl",
                 host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 netns: str | None = None):
    """`start_kvd` on a given peer port (a node's kvd restarted where its peers know it)."""
    sock = str(tmp / f"{name}.sock")
    args = ["-m", "services.kvd", "--host", host, "--port", str(port), "--socket", sock,
            "--backend", backend]
    proc = start(in_netns(netns, args) if netns else args, tmp / f"{name}.log", env)
    wait_healthy(f"unix:{sock}", proc)
    return proc, sock, f"{host}:{port}"


def in_netns(netns: str, args: list[str]) -> list[str]:
    """`start` arguments that run `python *args` inside network namespace `netns` (the
    process execs into `ip netns exec`, so its pid is the Python process's)."""
    return ["-c", "import os,sys; os.execvp('ip', ['ip','netns','exec',sys.argv[1],"
                  "sys.executable, *sys.argv[2:]])", netns, *args]


def kill(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGKILL now (a crash, for fault tests); returns the exit code."""
    if proc.poll() is None:
        proc.kill()
    return proc.wait(timeout)
