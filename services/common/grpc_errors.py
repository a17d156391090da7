"""One exception interceptor for every Tandem gRPC server.

Contract: handlers map the failures they expect to status codes themselves (and abort); any
other exception escaping a unary, server-streaming or client-streaming handler is logged with its
traceback and answered INTERNAL with a one-line message, never left to gRPC's UNKNOWN. A request
whose bytes do not parse as the method's message is answered INVALID_ARGUMENT before any handler
runs; in a client stream, iterating over such a message raises `MalformedRequest` (a
ValueError) in the handler, and one the handler lets escape is answered INVALID_ARGUMENT.
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

# gRPC binds with SO_REUSEPORT by default: a second process on the same port would silently
# share it (two kvds on one node, two workers on one port). Refuse instead.
SERVER_OPTIONS = [("grpc.so_reuseport", 0)]
# A client channel to a server that went away retries every 250 ms at first, 2 s at most,
# instead of gRPC's default of up to 2 minutes: a restarted process is reached within seconds.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250),
                     ("grpc.min_reconnect_backoff_ms", 250),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Unexpected exceptions from any handler: traceback logged, INTERNAL answered."""

    async def intercept_service(self, continuation: Callable[..., Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        deserializer = _lenient(handler.request_deserializer)
        if inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        if inspect.iscoroutinefunction(handler.stream_unary):
            return grpc.stream_unary_rpc_method_handler(
                _guard_client_stream(handler.stream_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        if inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        return handler


class MalformedRequest(ValueError):
    """A message of a client stream did not parse as the method's message."""


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def message(self, method: str) -> str:
        return f"{method}: malformed request: {self.error}"


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            return _Malformed(e)

    return parse


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext,
                            method: str) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))


async def _answer_internal(context: grpc.aio.ServicerContext, method: str) -> None:
    logger.exception("%s failed", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (see worker log)")


def _guard_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _refuse_malformed(request, context, method)
        try:
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _answer_internal(context, method)

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _refuse_malformed(request, context, method)
        try:
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _answer_internal(context, method)

    return guarded


def _guard_client_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Malformed):
                    raise MalformedRequest(request.message(method))
                yield request

        try:
            return await behavior(parsed(), context)
        except MalformedRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await _answer_internal(context, method)

    return guarded
