"""A PD worker with no kvd on its node starts one that outlives it; the next worker attaches
to it, and a restarted worker re-attaches to its own pool."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest

from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from tests.procs import free_port, start, stop, wait_healthy
from tests.tiny_models import make_tiny_model


def _pids_with(arg: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in cmdline and b"services.kvd" in cmdline:
                pids.append(int(entry.name))
    return pids


async def _stats(sock: str) -> kvd_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
        return await kvd_pb2_grpc.KvdServiceStub(ch).Stats(kvd_pb2.StatsRequest())


def _worker(tmp: Path, model: Path, mode: str, sock: str, kvd_port: int, port: int):
    args = ["-m", "services.cli", "serve", "--model-path", str(model), "--disaggregation-mode",
            mode, "--port", str(port), "--kvd-socket", sock, "--kvd-port", str(kvd_port),
            "--disaggregation-transfer-backend", "nixl", "--num-kv-pages", "64"]
    proc = start(args, tmp / f"{mode}-{port}.log")
    wait_healthy(f"127.0.0.1:{port}", proc, timeout=120)
    return proc


def test_worker_starts_kvd_which_outlives_it_and_is_shared(tmp_path):
    model = tmp_path / "m"
    make_tiny_model("llama", model)
    sock, kvd_port = str(tmp_path / "node.sock"), free_port()
    decode_port, prefill_port = free_port(), free_port()
    procs = []
    try:
        procs.append(_worker(tmp_path, model, "decode", sock, kvd_port, decode_port))
        (kvd_pid,) = _pids_with(sock)
        assert stop(procs.pop()) == 0
        stats = asyncio.run(_stats(sock))  # the kvd outlived its starter
        assert [p.worker_id for p in stats.pools] == [f"decode-{decode_port}"]
        procs.append(_worker(tmp_path, model, "prefill", sock, kvd_port, prefill_port))
        procs.append(_worker(tmp_path, model, "decode", sock, kvd_port, decode_port))
        assert _pids_with(sock) == [kvd_pid]  # one kvd per node
        stats = asyncio.run(_stats(sock))
        assert sorted(p.worker_id for p in stats.pools) == sorted(
            [f"decode-{decode_port}", f"prefill-{prefill_port}"])  # the decode pool re-attached
        log = (tmp_path / f"decode-{decode_port}.log").read_text()
        assert "re-attached to KV pool" in log
    finally:
        for proc in procs:
            stop(proc)
        for pid in _pids_with(sock):
            os.kill(pid, signal.SIGTERM)


def test_worker_refuses_a_kvd_with_another_backend(tmp_path):
    model = tmp_path / "m"
    make_tiny_model("llama", model)
    sock, kvd_port = str(tmp_path / "node.sock"), free_port()
    kvd = start(["-m", "services.kvd", "--socket", sock, "--port", str(kvd_port),
                 "--backend", "mooncake"], tmp_path / "kvd.log")
    try:
        wait_healthy(f"unix:{sock}", kvd)
        port = free_port()
        worker = start(["-m", "services.cli", "serve", "--model-path", str(model),
                        "--disaggregation-mode", "prefill", "--port", str(port),
                        "--kvd-socket", sock, "--disaggregation-transfer-backend", "nixl"],
                       tmp_path / "w.log")
        assert worker.wait(120) == 2
        log = (tmp_path / "w.log").read_text()
        assert "one node, one backend" in log and "Traceback" not in log
    finally:
        stop(kvd)


@pytest.mark.parametrize("backend, env, words", [
    ("ascend", {}, "memfabric"),
    ("nixl", {"SGLANG_DISAGGREGATION_NIXL_BACKEND": "NOSUCHPLUGIN"}, "NOSUCHPLUGIN"),
])
def test_unavailable_backend_fails_at_start_naming_what_is_missing(tmp_path, backend, env,
                                                                   words):
    sock = str(tmp_path / "k.sock")
    kvd = start(["-m", "services.kvd", "--socket", sock, "--port", str(free_port()),
                 "--backend", backend], tmp_path / "kvd.log", env)
    assert kvd.wait(60) == 2
    log = (tmp_path / "kvd.log").read_text()
    assert words in log and "Traceback" not in log


def test_workers_starting_together_share_one_kvd(tmp_path):
    model = tmp_path / "m"
    make_tiny_model("llama", model)
    sock, kvd_port = str(tmp_path / "node.sock"), free_port()
    ports = [free_port(), free_port()]
    procs = [start(["-m", "services.cli", "serve", "--model-path", str(model),
                    "--disaggregation-mode", mode, "--port", str(port), "--kvd-socket", sock,
                    "--kvd-port", str(kvd_port), "--disaggregation-transfer-backend", "nixl",
                    "--num-kv-pages", "64"], tmp_path / f"{mode}.log")
             for mode, port in zip(("prefill", "decode"), ports, strict=True)]
    try:
        for proc, port in zip(procs, ports, strict=True):
            wait_healthy(f"127.0.0.1:{port}", proc, timeout=120)
        assert len(_pids_with(sock)) == 1
        assert len(asyncio.run(_stats(sock)).pools) == 2
    finally:
        for proc in procs:
            stop(proc)
        for pid in _pids_with(sock):
            os.kill(pid, signal.SIGTERM)
