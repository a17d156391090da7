"""Real stacks for gateway tests: kvds, workers and `tandem gateway` processes on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.pd.harness import Node, launch_worker, start_node, wait_baseline
from tests.procs import free_port, kill, start, stop, wait_healthy

API_KEY = "sk-tandem-test"

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs


def scrape(url: str) -> dict[str, dict[Labels, float]]:
    """A service's /metrics: sample name -> sorted labels -> value (prometheus_client's parser)."""
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def metric(service: str, name: str, /, **labels: str) -> float:
    """Sum of the samples of `name` at the service's /metrics whose labels include `labels`
    (0 when there are none). Positional-only: `url` is a label name too."""
    return sum(value for found, value in scrape(service).get(name, {}).items()
               if labels.items() <= dict(found).items())


def start_gateway(tmp: Path, args: list[str], env: dict[str, str] | None = None,
                  wait: bool = True, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """`tandem gateway ARGS --port P`; with `wait`, returns once /health is 200."""
    port = free_port()
    proc = start(["-m", "services.cli", "gateway", *args, "--port", str(port),
                  "--health-check-interval-secs", "0.5", "--health-success-threshold", "1",
                  "--health-failure-threshold", "2"], tmp / f"gateway-{port}.log", env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see its log in {tmp}")
        try:
            r = httpx.get(f"{url}/health" if wait else f"{url}/liveness", timeout=1.0)
            if r.status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway at {url} not ready within {timeout}s")
        time.sleep(0.1)


@dataclass
class Stack:
    """Processes of one test deployment; `stop_all` ends them all."""

    tmp: Path
    model: str
    backend: str = "mooncake"
    nodes: list[Node] = field(default_factory=list)
    workers: list[tuple[subprocess.Popen, int, str, Node | None]] = field(default_factory=list)
    gateways: list[subprocess.Popen] = field(default_factory=list)

    def node(self, name: str, env: dict[str, str] | None = None) -> Node:
        self.nodes.append(start_node(self.tmp, name, self.backend, env=env))
        return self.nodes[-1]

    def worker(self, mode: str, node: Node | None, extra: list[str] | None = None,
               env: dict[str, str] | None = None) -> str:
        """A worker's gRPC URL. Unified workers (node None) need no kvd."""
        if node is None:
            port = free_port()
            proc = start(["-m", "services.cli", "serve", "--model-path", self.model,
                          "--port", str(port), "--page-size", "4", "--num-kv-pages", "512",
                          *(extra or [])], self.tmp / f"unified-{port}.log", env)
            wait_healthy(f"127.0.0.1:{port}", proc, timeout=120)
        else:
            proc, port = launch_worker(self.tmp, mode, self.model, node, self.backend,
                                       extra=extra, env=env)
        self.workers.append((proc, port, mode, node))
        return f"http://127.0.0.1:{port}"

    def gateway(self, args: list[str], env: dict[str, str] | None = None,
                wait: bool = True) -> str:
        proc, url = start_gateway(self.tmp, args, env, wait)
        self.gateways.append(proc)
        return url

    def kill_worker(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        for proc, p, _, _ in self.workers:
            if p == port:
                kill(proc)

    def assert_baseline(self, timeout: float = 10.0) -> float:
        """Every live kvd pins nothing and every live worker has all pages free."""
        nodes = [n for n in self.nodes if n.kvd.poll() is None]
        workers = [(f"127.0.0.1:{port}", mode) for proc, port, mode, _ in self.workers
                   if proc.poll() is None]
        return asyncio.run(wait_baseline(nodes, workers, timeout))

    def stop_all(self) -> None:
        for proc in self.gateways:
            stop(proc)
        for proc, *_ in self.workers:
            stop(proc)
        for node in self.nodes:
            stop(node.kvd)
