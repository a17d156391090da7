"""One exception interceptor for every Tandem gRPC server.

Contract: handlers map the failures they expect to status codes themselves (and abort); any
other exception escaping a unary or server-streaming handler is logged with its traceback and
answered INTERNAL with a one-line message, never left to gRPC's UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

logger = logging.getLogger(__name__)


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Unexpected exceptions from any handler: traceback logged, INTERNAL answered."""

    async def intercept_service(self, continuation: Callable[..., Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


async def _answer_internal(context: grpc.aio.ServicerContext, method: str) -> None:
    logger.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (see worker log)")


def _guard_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _answer_internal(context, method)

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _answer_internal(context, method)

    return guarded
