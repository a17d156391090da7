"""How a worker finds, starts and talks to its node's kvd.

Contract: `ensure_kvd` makes sure a kvd answers on the node's unix socket, starting one as a
separate, detached process when none does (it outlives the worker, so the seed's command
lines, which name no kvd, work as written; the next worker on the node attaches to it). A
running kvd with another transfer backend is a start-up error. `KvdClient` wraps the local
KvdService: `attach` returns the worker's pool memory, mapped — a shared-memory segment, or
with a GPU placement (`gpu_placement`) kvd's VRAM allocation opened through CUDA IPC on the
worker's GPU (an `IpcMapping` the worker closes on exit; kvd keeps the allocation for a
re-attach). The worker computes in it; kvd owns it. The other calls are the room operations
of kvd.proto.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import cudart
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.common.ready_flags import ReadyFlags, flags_bytes
from services.common.shm import map_segment
from services.common.vram import IpcMapping

logger = logging.getLogger(__name__)


class KvdUnavailable(RuntimeError):
    """No kvd could be reached or started; the message says where and why."""


class RoomFailed(RuntimeError):
    """A room's KV did not move; `code` is the status to answer the client with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, room: str, error: grpc.aio.AioRpcError,
                 keep: tuple[grpc.StatusCode, ...] = ()) -> RoomFailed:
        """kvd's status, kept where it tells the client something (and for `keep`), else
        UNAVAILABLE."""
        code = error.code()
        if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.CANCELLED, *keep):
            code = grpc.StatusCode.UNAVAILABLE  # the KV path failed; a retry may succeed
        return cls(code, f"KV transfer of room {room!r} failed: {error.details()}")


def kvd_is_serving(socket_path: str, timeout: float = 10.0) -> bool:
    """Whether a kvd answers SERVING on the socket. A kvd that is there but slow to answer (a
    loaded machine) is waited for, up to `timeout`: taking it for absent would start a second."""
    if not os.path.exists(socket_path):
        return False
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def ensure_kvd(socket_path: str, host: str, port: int, backend: str, ib_device: str | None,
               timeout: float = 60.0) -> kvd_pb2.StatsResponse:
    """Attach to the node's kvd, starting it if needed; returns its Stats. Workers starting
    together serialize on a lock file, so a node never gets two kvds."""
    with open(f"{socket_path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _start_kvd_unless_serving(socket_path, host, port, backend, ib_device, timeout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            stats = kvd_pb2_grpc.KvdServiceStub(channel).Stats(kvd_pb2.StatsRequest(),
                                                               timeout=timeout)
        except grpc.RpcError as e:
            raise KvdUnavailable(f"the kvd on unix:{socket_path} does not answer: "
                                 f"{e.code().name}: {e.details()}") from None
    if stats.backend != backend:
        raise KvdUnavailable(
            f"the kvd on unix:{socket_path} uses transfer backend {stats.backend!r}, this "
            f"worker asked for {backend!r} (--disaggregation-transfer-backend); one node, "
            "one backend"
        )
    return stats


def _start_kvd_unless_serving(socket_path: str, host: str, port: int, backend: str,
                              ib_device: str | None, timeout: float) -> None:
    if not kvd_is_serving(socket_path):
        log_path = f"{socket_path}.log"
        args = [sys.executable, "-m", "services.kvd", "--socket", socket_path, "--host", host,
                "--port", str(port), "--backend", backend]
        if ib_device:
            args += ["--ib-device", ib_device]
        logger.info("no kvd on unix:%s; starting one (log: %s)", socket_path, log_path)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, "UCX_MODULES": "^ib"})
        deadline = time.monotonic() + timeout
        while not kvd_is_serving(socket_path):
            if proc.poll() is not None:
                raise KvdUnavailable(f"kvd exited with status {proc.returncode} at start: "
                                     f"{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise KvdUnavailable(f"kvd did not come up on unix:{socket_path} in {timeout}s")
            time.sleep(0.1)


def _tail(path: str, num_bytes: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - num_bytes))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"


class KvdClient:
    """The worker's async client of its node's kvd (one per worker process)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._channel = grpc.aio.insecure_channel(f"unix:{socket_path}")
        self.stub = kvd_pb2_grpc.KvdServiceStub(self._channel)

    async def attach(
        self, worker_id: str, layout: kvd_pb2.KvLayout,
        placement: kvd_pb2.KvPlacement | None = None,
    ) -> tuple[kvd_pb2.AttachPoolResponse, mmap.mmap | IpcMapping]:
        """The pool, mapped here: host shared memory, or (with `placement`) VRAM on the
        placement's GPU. A GPU pool takes kvd seconds to allocate and register: 120 s."""
        reply = await self.stub.AttachPool(
            kvd_pb2.AttachPoolRequest(worker_id=worker_id, layout=layout, placement=placement),
            timeout=30.0 if placement is None else 120.0)
        if placement is None:
            return reply, map_segment(reply.segment_name, reply.total_bytes)
        if not reply.cuda_ipc_handle:
            raise KvdUnavailable(f"kvd on unix:{self.socket_path} answered a GPU attach "
                                 "without a CUDA IPC handle")
        return reply, IpcMapping.open(placement.gpu_index, reply.cuda_ipc_handle,
                                      reply.total_bytes)

    async def close(self) -> None:
        await self._channel.close()


def map_ready_flags(reply: kvd_pb2.AttachPoolResponse, num_pages: int) -> ReadyFlags | None:
    """The pool's ready flags (ready_flags.py) as kvd's AttachPool answer names them; None
    from a kvd that keeps none."""
    if not reply.ready_flags_segment:
        return None
    return ReadyFlags(map_segment(reply.ready_flags_segment, flags_bytes(num_pages)), num_pages)


def kv_layout(num_pages: int, num_layers: int, page_size: int, num_kv_heads: int,
              head_dim: int, dtype: str, model: str) -> kvd_pb2.KvLayout:
    """The pool layout a worker asks kvd for; `model` fingerprints the weights' shape so two
    sides with different models refuse to exchange KV."""
    return kvd_pb2.KvLayout(num_pages=num_pages, num_layers=num_layers, page_size=page_size,
                            num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
                            model=model)


def gpu_placement(device: int) -> kvd_pb2.KvPlacement:
    """A VRAM pool on this process's CUDA device `device`, named by UUID for kvd."""
    cudart.check_device(device)
    return kvd_pb2.KvPlacement(gpu_index=device, gpu_uuid=cudart.device_uuid(device))


def advertised_host(host: str) -> str:
    """The address peers reach this node's kvd at: the worker's --host, unless it is a
    wildcard, then this host's name resolved."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    import socket

    return socket.gethostbyname(socket.gethostname())
