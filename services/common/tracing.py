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
- W3C trace context crosses processes in gRPC metadata (`grpc_metadata()` on the client side,
  `context_from_grpc(servicer_context)` on the server side) and arrives from HTTP clients in
  their `traceparent` header (`context_from_headers`).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

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
