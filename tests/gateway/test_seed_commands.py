"""The seed's "Llama Single Node" command lines, read from ../shared/seed/pd_disaggregation.md,
run with `tandem serve` / `tandem gateway` in their place and the embedded model as
--model-path: each variant (Mooncake, NIXL) brings up a stack that answers through the OpenAI
SDK. And `tandem stack` (what `make serve` runs) comes up, answers and stops everything on
Ctrl-C.

The seed's ports (30000, 30001, 8000) are used as written; the kvd the workers start is kept
apart from any other on this machine with TANDEM_KVD_SOCKET / TANDEM_KVD_PORT (the seed's
commands do not name one). Mooncake's variant names `--disaggregation-ib-device mlx5_roce0`:
without that RDMA device the prefill worker must refuse to start, naming it, and the variant is
then run without the flag (TCP).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.engine.embedded import embedded_model_path
from tests.procs import free_port, start, stop

SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "pd_disaggregation.md"
IB_SYSFS = Path("/sys/class/infiniband")
LAUNCHERS = {"python -m sglang.launch_server": ["-m", "services.cli", "serve"],
             "python -m sglang_router.launch_router": ["-m", "services.cli", "gateway"]}


def seed_blocks(title: str) -> dict[str, list[list[str]]]:
    """The first ```bash block under `### {title}` in each `## ` section of the seed, by the
    section's name in lower case: its commands, each a list of arguments."""
    blocks = {}
    for chapter in re.split(r"^## ", SEED.read_text(), flags=re.M)[1:]:
        name = chapter.splitlines()[0].strip().lower()
        for section in re.split(r"^### ", chapter, flags=re.M)[1:]:
            if section.splitlines()[0].strip() != title:
                continue
            body = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
            joined = re.sub(r"\\\n", " ", body)
            blocks[name] = [shlex.split(line) for line in joined.splitlines() if line.strip()]
    return blocks


def tandem_args(argv: list[str], model: str) -> list[str]:
    launcher = " ".join(argv[:3])
    assert launcher in LAUNCHERS, f"unexpected command in the seed: {' '.join(argv)}"
    args = LAUNCHERS[launcher] + argv[3:]
    if "--model-path" in args:
        args[args.index("--model-path") + 1] = model
    return args


def without_flag(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def _kvd_pids(socket_path: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"services.kvd" in cmdline and socket_path.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _ask(base: str) -> str:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, temperature=0, max_tokens=12,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    return reply.choices[0].message.content


def _wait_health(base: str, procs: list[subprocess.Popen], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{base} not healthy within {timeout}s"
        time.sleep(0.25)


@pytest.mark.parametrize("variant", ["mooncake", "nixl"])
def test_seed_llama_single_node_commands(variant, tmp_path):
    commands = seed_blocks("Llama Single Node")[variant]
    assert len(commands) == 3  # prefill, decode, router
    model = str(embedded_model_path())
    prefill, decode, gateway = (tandem_args(c, model) for c in commands)
    socket_path = str(tmp_path / "kvd.sock")
    env = {"TANDEM_KVD_SOCKET": socket_path, "TANDEM_KVD_PORT": str(free_port())}
    procs: list[subprocess.Popen] = []
    try:
        if "--disaggregation-ib-device" in prefill:
            device = prefill[prefill.index("--disaggregation-ib-device") + 1]
            if not (IB_SYSFS / device).exists():
                refused = subprocess.run([sys.executable, *prefill], capture_output=True,
                                         text=True, timeout=180,
                                         env={**os.environ, **env})
                assert refused.returncode == 2, refused.stderr[-2000:]
                assert device in refused.stderr.strip().splitlines()[-1]
                assert "Traceback" not in refused.stderr
                prefill = without_flag(prefill, "--disaggregation-ib-device")
                decode = without_flag(decode, "--disaggregation-ib-device")
        for name, args in (("prefill", prefill), ("decode", decode), ("gateway", gateway)):
            procs.append(start(args, tmp_path / f"{name}.log", env))
        _wait_health("http://127.0.0.1:8000", procs)
        assert "Paris" in _ask("http://127.0.0.1:8000")
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stats = kvd_pb2_grpc.KvdServiceStub(channel).Stats(kvd_pb2.StatsRequest(), timeout=5)
        assert stats.backend == variant and stats.rooms_completed >= 2  # kvd moved the KV
        assert stats.open_rooms == 0 and all(p.pinned_pages == 0 for p in stats.pools)
    finally:
        for p in reversed(procs):
            stop(p)
        for pid in _kvd_pids(socket_path):  # the kvd the first worker started outlives it
            os.kill(pid, signal.SIGTERM)


def test_seed_ascend_commands_refuse_to_start_naming_what_is_missing(tmp_path):
    """No Ascend NPU here: the prefill worker's kvd cannot start; one line says why."""
    prefill = tandem_args(seed_blocks("Llama Single Node")["ascend"][0],
                          str(embedded_model_path()))
    env = {**os.environ, "TANDEM_KVD_SOCKET": str(tmp_path / "kvd.sock"),
           "TANDEM_KVD_PORT": str(free_port())}
    refused = subprocess.run([sys.executable, *prefill], capture_output=True, text=True,
                             timeout=180, env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "ascend" in refused.stderr.lower() and "memfabric" in refused.stderr.lower()


def test_tandem_stack_serves_and_stops_everything_on_ctrl_c(tmp_path):
    ports = [free_port() for _ in range(4)]
    log = open(tmp_path / "stack.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "stack", "--port", str(ports[0]),
         "--prefill-port", str(ports[1]), "--decode-port", str(ports[2]),
         "--kvd-port", str(ports[3])], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{ports[0]}"
    try:
        _wait_health(base, [proc])
        deadline = time.monotonic() + 30
        while b"Tandem is serving" not in (tmp_path / "stack.log").read_bytes():
            assert time.monotonic() < deadline, "no banner after /health was 200"
            time.sleep(0.1)
        banner = (tmp_path / "stack.log").read_text(errors="replace")
        assert f"curl {base}/v1/chat/completions" in banner
        assert "Paris" in _ask(base)
        children = _children(proc.pid)
        assert len(children) == 4  # kvd, prefill, decode, gateway
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not [c for c in children if Path(f"/proc/{c}").exists()
                    and b"services" in Path(f"/proc/{c}/cmdline").read_bytes()]
    finally:
        if proc.poll() is None:
            proc.kill()


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(proc.name))
    return found
