"""The router's stream when a worker fails after its first response: the client already has
tokens, so the stream ends with the failure's APIError (no retry), whatever the status."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.proto.tandem.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.config import WorkerSpec
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.policies import make_policy
from services.gateway.router import Router
from services.gateway.workers import WorkerGroup


class _FailsAfterOne(worker_pb2_grpc.GenerateServiceServicer):
    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code

    async def Generate(self, request: worker_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext):
        yield worker_pb2.GenerateResponse(text="Par")
        await context.abort(self.code, "the worker gave up")


async def _stream_until_failure(code: grpc.StatusCode) -> tuple[list[str], APIError]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_GenerateServiceServicer_to_server(_FailsAfterOne(code), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    group = WorkerGroup("worker", [WorkerSpec(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}")])
    worker = group.workers[0]
    worker.info = worker_pb2.ModelInfoResponse(model_name="m", disaggregation_mode="null")
    worker.healthy = True  # as the health checker would have it
    router = Router({"worker": group}, {"worker": make_policy("round_robin")}, GatewayMetrics(),
                    pd=False, request_timeout_s=10.0, max_retries=3, check_timeout_s=1.0)
    texts: list[str] = []
    try:
        with pytest.raises(APIError) as raised:
            async for response in router.stream(worker_pb2.GenerateRequest(request_id="r"),
                                                "m", "hello"):
                texts.append(response.text)
        return texts, raised.value
    finally:
        await worker.close()
        await server.stop(None)


@pytest.mark.parametrize("code, status", [(grpc.StatusCode.INVALID_ARGUMENT, 400),
                                          (grpc.StatusCode.CANCELLED, 499),
                                          (grpc.StatusCode.INTERNAL, 500)])
def test_failure_after_first_response_ends_stream_with_its_status(code, status):
    texts, error = asyncio.run(_stream_until_failure(code))
    assert texts == ["Par"]  # streamed once, not retried
    assert error.status == status
    assert error.code == code.name.lower()
    assert "the worker gave up" in error.message
