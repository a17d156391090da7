"""kvd's two gRPC servers: KvdService for local workers (unix socket), KvdPeerService for
other kvds (TCP). Each also serves grpc.health.v1.

Servicers only convert between protobuf and `KvdCore` and map errors to status codes:
RoomError carries its code; bad page ids or layouts are INVALID_ARGUMENT; an unknown pool is
NOT_FOUND; anything unexpected is logged with its traceback and answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import tracing
from services.common.cudart import CudaError, CudaUnavailable
from services.common.grpc_errors import SERVER_OPTIONS, ExceptionInterceptor
from services.common.grpc_server import bind_address
from services.common.metrics_http import MetricsEndpoint, start_metrics_server
from services.common.proto.tandem.v1 import kvd_pb2, kvd_pb2_grpc
from services.common.shm import owner_prefix, remove_orphans
from services.kvd.backends.base import TransferError, create_backend
from services.kvd.config import KvdConfig
from services.kvd.core import KvdCore, RoomError
from services.kvd.pool_memory import GpuPlacement
from services.kvd.pools import PoolLayout

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _mapped(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Answer known failures with their status, the unexpected with INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except RoomError as e:
            await context.abort(grpc.StatusCode[e.code], str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except KeyError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            logger.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"kvd: {method.__name__} failed")
        raise AssertionError("unreachable")

    return wrapper


def _gpu(placement: GpuPlacement | None) -> str:
    return "host memory" if placement is None else f"GPU {placement.gpu_index}"


class KvdServicer(kvd_pb2_grpc.KvdServiceServicer):
    def __init__(self, core: KvdCore) -> None:
        self.core = core
        self.metrics_address = ""  # host:port of /metrics, once served

    @_mapped
    async def AttachPool(self, request: kvd_pb2.AttachPoolRequest,
                         context: grpc.aio.ServicerContext) -> kvd_pb2.AttachPoolResponse:
        placement = None
        if request.HasField("placement"):
            placement = GpuPlacement(request.placement.gpu_index, request.placement.gpu_uuid)
        try:
            pool, reattached = await self.core.pools.attach(
                request.worker_id, PoolLayout.from_proto(request.layout), placement)
        except CudaUnavailable as e:
            raise RoomError("FAILED_PRECONDITION", f"kvd cannot hold GPU pools: {e}") from None
        except CudaError as e:
            code = "RESOURCE_EXHAUSTED" if "MemoryAllocation" in str(e) else "INTERNAL"
            raise RoomError(code, f"kvd could not allocate the pool on {_gpu(placement)}: {e}"
                            ) from None
        except TransferError as e:  # a backend refused to register the pool's memory
            raise RoomError("INTERNAL", f"kvd could not register the pool: {e}") from None
        memory = pool.memory
        return kvd_pb2.AttachPoolResponse(
            pool_id=pool.pool_id, segment_name=memory.segment_name,
            total_bytes=pool.layout.total_bytes, reattached=reattached,
            cuda_ipc_handle=memory.ipc_handle,
            kvd_gpu_index=memory.device if memory.device is not None else 0,
            ready_flags_segment=pool.flags.segment_name)

    @_mapped
    async def ExpectKv(self, request: kvd_pb2.ExpectKvRequest,
                       context: grpc.aio.ServicerContext) -> kvd_pb2.ExpectKvResponse:
        with tracing.server_span("kvd.expect", context, **{"tandem.room": request.room,
                                                           "tandem.pages": len(request.page_ids)}
                                 ) as span:
            response = await self.core.expect_kv(request)
            tracing.set_attributes(span, **{"tandem.kv_bytes": response.kv_bytes})
            return response

    @_mapped
    async def AwaitBootstrap(self, request: kvd_pb2.AwaitBootstrapRequest,
                             context: grpc.aio.ServicerContext
                             ) -> kvd_pb2.AwaitBootstrapResponse:
        with tracing.server_span("kvd.await_bootstrap", context, **{"tandem.room": request.room}):
            return await self.core.await_bootstrap(request)

    @_mapped
    async def SendKv(self, request: kvd_pb2.SendKvRequest,
                     context: grpc.aio.ServicerContext) -> kvd_pb2.SendKvResponse:
        return await self._send(request, context)

    async def _send(self, request: kvd_pb2.SendKvRequest, context: grpc.aio.ServicerContext,
                    aux: asyncio.Future[kvd_pb2.RoomAux] | None = None
                    ) -> kvd_pb2.SendKvResponse:
        """`core.send_kv` in its `kvd.send` span (`aux`: SendKvAhead's later first token)."""
        with tracing.server_span("kvd.send", context, **{
                "tandem.room": request.room, "tandem.pages": len(request.page_ids),
                "tandem.ahead": aux is not None}) as span:
            response = await self.core.send_kv(request, aux)
            if span is not None:  # tracing on
                span.set_attributes(tracing.kv_transfer_attributes(response,
                                                                   len(request.page_ids)))
            return response

    @_mapped
    async def SendKvAhead(self, request_iterator: AsyncIterator[kvd_pb2.SendKvPart],
                          context: grpc.aio.ServicerContext) -> kvd_pb2.SendKvResponse:
        parts = aiter(request_iterator)
        first = await anext(parts, None)
        if first is None or first.WhichOneof("part") != "request":
            raise RoomError("INVALID_ARGUMENT", "SendKvAhead: the first message must be a "
                            "`request`")
        request = first.request
        if request.HasField("aux"):
            raise RoomError("INVALID_ARGUMENT", f"room {request.room!r}: SendKvAhead's aux "
                            "comes as the second message, not in the request")
        aux: asyncio.Future[kvd_pb2.RoomAux] = asyncio.get_running_loop().create_future()
        aux.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved either way
        reader = asyncio.ensure_future(_read_aux(parts, aux, request.room))
        try:
            return await self._send(request, context, aux)
        finally:
            reader.cancel()

    @_mapped
    async def ReleaseRoom(self, request: kvd_pb2.ReleaseRoomRequest,
                          context: grpc.aio.ServicerContext) -> kvd_pb2.ReleaseRoomResponse:
        return kvd_pb2.ReleaseRoomResponse(existed=await self.core.release_room(request.room))

    @_mapped
    async def Stats(self, request: kvd_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> kvd_pb2.StatsResponse:
        core = self.core
        return kvd_pb2.StatsResponse(
            pools=[kvd_pb2.PoolStats(pool_id=p.pool_id, worker_id=p.worker_id,
                                     num_pages=p.layout.num_pages, pinned_pages=p.num_pinned)
                   for p in core.pools.pools()],
            open_rooms=core.num_open_rooms, rooms_completed=core.counters.rooms_completed,
            rooms_failed=core.counters.rooms_failed, bytes_sent=core.counters.bytes_sent,
            backend=core.backend.name, peer_address=core.peer_address,
            metrics_address=self.metrics_address,
        )


class KvdPeerServicer(kvd_pb2_grpc.KvdPeerServiceServicer):
    def __init__(self, core: KvdCore) -> None:
        self.core = core

    @_mapped
    async def Handshake(self, request: kvd_pb2.HandshakeRequest,
                        context: grpc.aio.ServicerContext) -> kvd_pb2.HandshakeResponse:
        self.core.on_handshake(request)
        return kvd_pb2.HandshakeResponse(kvd_id=self.core.kvd_id,
                                         backend_metadata=self.core.backend.metadata())

    @_mapped
    async def Bootstrap(self, request: kvd_pb2.BootstrapRequest,
                        context: grpc.aio.ServicerContext) -> kvd_pb2.BootstrapResponse:
        self.core.on_bootstrap(request)
        return kvd_pb2.BootstrapResponse()

    @_mapped
    async def TransferDone(self, request: kvd_pb2.TransferDoneRequest,
                           context: grpc.aio.ServicerContext) -> kvd_pb2.TransferDoneResponse:
        self.core.on_transfer_done(request)
        return kvd_pb2.TransferDoneResponse()

    @_mapped
    async def CancelRoom(self, request: kvd_pb2.CancelRoomRequest,
                         context: grpc.aio.ServicerContext) -> kvd_pb2.CancelRoomResponse:
        await self.core.on_cancel_room(request)
        return kvd_pb2.CancelRoomResponse()

    @_mapped
    async def Heartbeat(self, request: kvd_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> kvd_pb2.HeartbeatResponse:
        return kvd_pb2.HeartbeatResponse(kvd_id=self.core.kvd_id)


class KvdServer:
    """Both servers and the heartbeat task around one `KvdCore`."""

    def __init__(self, config: KvdConfig) -> None:
        self.config = config
        for name in remove_orphans():
            logger.info("removed /dev/shm/%s: its kvd is gone", name)
        kvd_id = owner_prefix() + uuid.uuid4().hex[:8]
        backend = create_backend(config.backend, hostname=config.host,
                                 ib_device=config.ib_device)
        self.core = KvdCore(kvd_id, config.peer_address, backend, create_backend("local"),
                            config.settings)
        self._health = health.HealthServicer()
        self._heartbeats: asyncio.Task[None] | None = None
        self.metrics = MetricsEndpoint()

    async def start(self) -> None:
        """Bind and serve (servers must be made on the running loop)."""
        await _claim_socket(self.config.socket)
        self._local = grpc.aio.server(interceptors=[ExceptionInterceptor()], options=SERVER_OPTIONS)
        self._peer = grpc.aio.server(interceptors=[ExceptionInterceptor()], options=SERVER_OPTIONS)
        servicer = KvdServicer(self.core)
        kvd_pb2_grpc.add_KvdServiceServicer_to_server(servicer, self._local)
        kvd_pb2_grpc.add_KvdPeerServiceServicer_to_server(KvdPeerServicer(self.core), self._peer)
        for server in (self._local, self._peer):
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        bind_address(self._local, f"unix:{self.config.socket}", "--socket")
        bind_address(self._peer, self.config.peer_address, "--host/--port")
        self.core.metrics.watch(asyncio.get_running_loop(), self.core.snapshot)
        self.metrics = start_metrics_server(self.core.metrics.registry, self.config.host,
                                            self.config.metrics_port, f"kvd {self.core.kvd_id}")
        servicer.metrics_address = self.metrics.address
        await self._local.start()
        await self._peer.start()
        self._heartbeats = asyncio.create_task(self.core.heartbeat_loop())
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        logger.info("kvd %s: backend %s, peers at %s, workers at unix:%s", self.core.kvd_id,
                    self.core.backend.name, self.config.peer_address, self.config.socket)

    async def stop(self, grace: float = 5.0) -> None:
        self._health.enter_graceful_shutdown()
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        await asyncio.gather(self._local.stop(grace), self._peer.stop(grace))
        await self.core.peers.close()
        self.metrics.close()
        self.core.queues.shutdown()
        self.close_memory()

    def close_memory(self) -> None:
        """Close the backends, then release the pools' memory (a backend may still use
        registered memory until closed). Idempotent; also the path when serving failed."""
        try:
            if self.core.listener is not None:  # it reads the backend's notifications
                self.core.listener.close()
            self.core.backend.close()
            self.core.local_backend.close()
            self.core.source_events.close()
        finally:
            self.core.pools.close()


async def _read_aux(parts: AsyncIterator[kvd_pb2.SendKvPart],
                    aux: asyncio.Future[kvd_pb2.RoomAux], room: str) -> None:
    """SendKvAhead's second message into `aux`; a missing, misplaced or malformed one fails
    the room (a RoomError on `aux`)."""
    try:
        part = await anext(parts, None)
    except ValueError as e:  # MalformedRequest
        error = RoomError("INVALID_ARGUMENT", f"room {room!r}: {e}")
    else:
        if part is not None and part.WhichOneof("part") == "aux":
            if not aux.done():
                aux.set_result(part.aux)
            return
        error = (RoomError("ABORTED", f"room {room!r}: the prefill worker ended its send "
                           "without the first token", "sender_failed") if part is None else
                 RoomError("INVALID_ARGUMENT", f"room {room!r}: SendKvAhead's second message "
                           "must be `aux`"))
    if not aux.done():
        aux.set_exception(error)


async def _claim_socket(path: str) -> None:
    """Remove a stale socket file left by a dead kvd; refuse if a live kvd answers on it."""
    if not os.path.exists(path):
        return
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=1.0)
        except grpc.aio.AioRpcError:
            os.unlink(path)
            return
    raise OSError(f"a kvd already serves unix:{path}")
