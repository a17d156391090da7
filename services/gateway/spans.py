"""The gateway's trace spans (see services/common/tracing.py): one `gateway.request` per HTTP
request, under it a `gateway.route` (the routing decision) and a `gateway.attempt` (both legs)
per attempt; the workers' spans hang under the attempt through gRPC metadata
(`tracing.metadata_for`), and all of them end with `tracing.end_span`. Every function is a no-op
returning None when tracing is off."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from services.common import tracing

_tracer = tracing.tracer("tandem.gateway")


def request_span(name: str, headers, attributes: dict) -> Span | None:
    if not tracing.enabled():
        return None
    parent = tracing.context_from_headers(headers)
    return _tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)


def attempt_spans(parent: Span | None, attempt: int, picked: list, policies: dict
                  ) -> Span | None:
    """Records the routing decision (a finished `gateway.route`) and starts the attempt."""
    if parent is None:
        return None
    ctx = trace.set_span_in_context(parent)
    route = {"tandem.attempt": attempt}
    for w in picked:
        route[f"tandem.{w.role}.url"] = w.url
        route[f"tandem.{w.role}.load"] = w.load
        route[f"tandem.{w.role}.policy"] = policies[w.role].name
    _tracer.start_span("gateway.route", context=ctx, attributes=route).end()
    return _tracer.start_span("gateway.attempt", context=ctx, kind=SpanKind.CLIENT,
                              attributes={"tandem.attempt": attempt})
