"""OpenTelemetry tracing for every Tandem process, configured by the standard OTEL_* variables.

Contract:
- `setup_tracing(default_service_name)` turns tracing on when an OTLP endpoint is configured
  (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and neither
  `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none` says otherwise. Spans are batched and
  exported over OTLP/gRPC; the sampler, the batch sizes and the exporter's options come from the
  SDK's own OTEL_* variables; `OTEL_SERVICE_NAME` overrides the default name. Returns whether
  tracing is on. `shutdown_tracing()` flushes what is buffered.
- `enabled()` is a module-level flag: hot paths test it and skip all tracing work when off, so
  that tracing costs nothing measurable unless it is configured.
- `server_span(name, servicer_context, **attributes)` opens the span of an incoming RPC under
  the caller's context; `span(name, **attributes)` a child of the current span. Both are
  context managers yielding the span (None when off); an exception leaving them marks the span
  failed. Attributes can be added later with `set_attributes(span, ...)`.
- W3C trace context crosses processes in gRPC metadata (`grpc_metadata()` on the client side,
  `context_from_grpc(servicer_context)` on the server side) and arrives from HTTP clients in
  their `traceparent` header (`context_from_headers`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.util.types import AttributeValue

logger = logging.getLogger(__name__)

_ENABLED = False
_PROVIDER = None


def enabled() -> bool:
    return _ENABLED


def _wanted() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup_tracing(default_service_name: str) -> bool:
    """Install the tracer provider and OTLP/gRPC exporter if OTEL_* asks for it."""
    global _ENABLED, _PROVIDER
    if _ENABLED or not _wanted():
        return _ENABLED
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _PROVIDER, _ENABLED = provider, True
    atexit.register(shutdown_tracing)
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    logger.info("tracing on: service %s, OTLP/gRPC to %s", name, endpoint)
    return True


def shutdown_tracing() -> None:
    if _PROVIDER is not None:
        _PROVIDER.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


_OFF = contextlib.nullcontext()  # what the span context managers are when tracing is off


def server_span(name: str, servicer_context, **attributes
                ) -> contextlib.AbstractContextManager[trace.Span | None]:
    if not _ENABLED:
        return _OFF
    return tracer("tandem").start_as_current_span(
        name, context=context_from_grpc(servicer_context), kind=trace.SpanKind.SERVER,
        attributes=attributes)


def span(name: str, **attributes) -> contextlib.AbstractContextManager[trace.Span | None]:
    if not _ENABLED:
        return _OFF
    return tracer("tandem").start_as_current_span(name, attributes=attributes)


def start_span(name: str, parent: trace.Span | None = None, servicer_context=None,
               server: bool = False, attributes: Mapping[str, AttributeValue] | None = None,
               ) -> trace.Span | None:
    """A span not made current (for async generators, whose code runs across yields): its
    parent is `parent`, else the caller found in `servicer_context`'s metadata. End it with
    `end_span`. None when off. (`attributes` is a mapping, not keywords as elsewhere here: the
    names have dots, and a `**{...}` could collide with the named parameters.)"""
    if not _ENABLED:
        return None
    ctx: otel_context.Context | None
    if parent is not None:
        ctx = trace.set_span_in_context(parent)
    else:
        ctx = context_from_grpc(servicer_context) if servicer_context is not None else None
    kind = trace.SpanKind.SERVER if server else trace.SpanKind.INTERNAL
    return tracer("tandem").start_span(name, context=ctx, kind=kind,
                                       attributes=dict(attributes or {}))


def end_span(current: trace.Span | None, error: BaseException | None = None,
             **attributes) -> None:
    if current is None:
        return
    if attributes:
        current.set_attributes(attributes)
    if error is not None:
        current.set_status(trace.Status(trace.StatusCode.ERROR, str(error) or type(error).__name__))
        current.record_exception(error)
    current.end()


def current_span() -> trace.Span | None:
    """The span current here (to parent a `start_span` made later elsewhere); None when off."""
    return trace.get_current_span() if _ENABLED else None


def metadata_for(current: trace.Span | None) -> list[tuple[str, str]] | None:
    """gRPC metadata carrying `current`'s context (None when off)."""
    if current is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(current))
    return list(carrier.items())


def set_attributes(current: trace.Span | None, **attributes) -> None:
    if current is not None:
        current.set_attributes(attributes)


def kv_transfer_attributes(sent, num_pages: int) -> dict:
    """Span attributes of one room's KV transfer, from kvd's SendKvResponse (the prefill
    worker's kv.transfer span and kvd's kvd.send span carry the same ones)."""
    seconds = sent.transfer_seconds
    return {"tandem.pages": num_pages, "tandem.kv_bytes": sent.kv_bytes,
            "tandem.backend": sent.backend, "tandem.queue_shard": sent.queue_shard,
            "tandem.descriptors": sent.num_descriptors,
            "tandem.gbps": sent.kv_bytes / seconds / 1e9 if seconds > 0 else 0.0}


def grpc_metadata() -> list[tuple[str, str]] | None:
    """The current trace context as gRPC metadata (None when tracing is off)."""
    if not _ENABLED:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items()) or None


def context_from_grpc(servicer_context) -> otel_context.Context | None:
    """The caller's trace context from an incoming RPC's metadata (None when off)."""
    if not _ENABLED:
        return None
    metadata = servicer_context.invocation_metadata() or ()
    return propagate.extract({k: v for k, v in metadata if isinstance(v, str)})


def context_from_headers(headers: Mapping[str, str] | Iterable[tuple[bytes, bytes]]
                         ) -> otel_context.Context | None:
    """A client's `traceparent` / `tracestate` from HTTP headers (None when off)."""
    if not _ENABLED:
        return None
    if isinstance(headers, Mapping):
        carrier = dict(headers)
    else:
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    return propagate.extract(carrier)
