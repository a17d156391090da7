"""`tandem stack`: a whole PD deployment on this machine — kvd, a prefill worker, a decode worker
and the gateway, each its own process — for trying Tandem out (`make serve` runs it).

Contract: starts the kvd, then both workers (the seed's ports: prefill 30000, decode 30001), then
the gateway (127.0.0.1:8000), and returns to the caller's terminal only when stopped: it prints
how to call the API once `/health` answers 200. Ctrl-C or SIGTERM stops the gateway, the
workers, then the kvd, each given time to drain. If any of them exits on its own, the others are
stopped and the exit status is 1, naming the process. Children die with this process (Linux
parent-death signal), so nothing is left behind if it is killed. Logs go to the terminal.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from services.common.kvd_client import kvd_is_serving
from services.common.process import parent_death

STOP_GRACE_S = 35.0  # workers drain live streams for up to 30 s
READY_TIMEOUT_S = 600.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen


def _spawn(name: str, args: list[str]) -> Child:
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args],
                            process_group=0, preexec_fn=parent_death(signal.SIGTERM))
    return Child(name, proc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="Hugging Face folder or GGUF (default: embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="gateway address")
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--prefill-port", type=int, default=30000)
    p.add_argument("--decode-port", type=int, default=30001)
    p.add_argument("--kvd-port", type=int, default=17000)
    p.add_argument("--disaggregation-transfer-backend", "--backend", dest="backend",
                   default="mooncake", choices=("nixl", "mooncake"))
    p.add_argument("--api-key", help="require this key at the gateway")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    socket_path = f"/tmp/tandem-stack-{os.getuid()}-{a.kvd_port}.sock"
    if kvd_is_serving(socket_path):
        print(f"tandem stack: error: a kvd already serves unix:{socket_path} (another stack "
              "is running?)", file=sys.stderr)
        return 2
    model = ["--model-path", a.model_path] if a.model_path else []
    node = ["--kvd-socket", socket_path, "--kvd-port", str(a.kvd_port),
            "--disaggregation-transfer-backend", a.backend]
    children: list[Child] = []
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        children.append(_spawn("kvd", ["kvd", "--socket", socket_path, "--port",
                                        str(a.kvd_port), "--backend", a.backend]))
        if not _wait(lambda: kvd_is_serving(socket_path), children, lambda: stopping, 60):
            return _report(children, stopping, "kvd")
        children.append(_spawn("prefill", ["serve", *model, "--disaggregation-mode", "prefill",
                                            "--port", str(a.prefill_port), *node]))
        children.append(_spawn("decode", ["serve", *model, "--disaggregation-mode", "decode",
                                           "--port", str(a.decode_port), *node]))
        gateway = ["gateway", "--pd-disaggregation",
                   "--prefill", f"http://127.0.0.1:{a.prefill_port}",
                   "--decode", f"http://127.0.0.1:{a.decode_port}",
                   "--host", a.host, "--port", str(a.port)]
        children.append(_spawn("gateway", gateway + (["--api-key", a.api_key]
                                                     if a.api_key else [])))
        base = f"http://{'127.0.0.1' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
        if not _wait(lambda: _healthy(base), children, lambda: stopping, READY_TIMEOUT_S):
            return _report(children, stopping, "the stack")
        print(_banner(base, a.api_key, _model_id(base, a.api_key)), flush=True)
        while not stopping:
            if any(c.proc.poll() is not None for c in children):
                return _report(children, stopping, "the stack")
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(children)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _model_id(base: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(f"{base}/v1/models", headers=headers, timeout=5.0).json()["data"][0]["id"]


def _wait(ready, children: list[Child], stopping, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ready():
        if stopping() or time.monotonic() > deadline:
            return False
        if any(c.proc.poll() is not None for c in children):
            return False
        time.sleep(0.2)
    return True


def _report(children: list[Child], stopping: bool, what: str) -> int:
    if stopping:
        return 0
    dead = [f"{c.name} (exit {c.proc.returncode})" for c in children
            if c.proc.poll() is not None]
    reason = f"{', '.join(dead)} stopped" if dead else "timed out"
    print(f"tandem stack: {what} did not come up or went down: {reason}; stopping the rest",
          file=sys.stderr)
    return 1


def _stop_all(children: list[Child]) -> None:
    """Gateway first, kvd last: each layer drains before the one it depends on goes."""
    for child in reversed(children):
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def _banner(base: str, api_key: str | None, model: str) -> str:
    key = api_key or "none"
    return f"""
Tandem is serving the OpenAI API on {base}/v1 (prefill, decode, kvd and gateway are separate
processes; Ctrl-C stops them all).

  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    {"-H 'Authorization: Bearer " + key + "' " if api_key else ""}-d '{{"model": "{model}", "temperature": 0, "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

  python -c 'import openai; c = openai.OpenAI(base_url="{base}/v1", api_key="{key}"); print(c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)'
"""  # noqa: E501


if __name__ == "__main__":
    raise SystemExit(main())
