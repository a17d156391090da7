"""The gateway's trace spans (see services/common/tracing.py): one `gateway.request` per HTTP
request, under it a `gateway.route` (the routing decision) and a `gateway.attempt` (both legs)
per attempt; the workers' spans hang under the attempt through gRPC metadata. Every function is
a no-op returning None when tracing is off."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

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


def metadata(span: Span | None) -> list[tuple[str, str]] | None:
    """W3C context of `span` for the workers' RPCs."""
    if span is None:
        return None
    from opentelemetry import propagate
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return list(carrier.items())


def end(span: Span | None, error: BaseException | None = None, **attributes) -> None:
    if span is None:
        return
    for key, value in attributes.items():
        span.set_attribute(key, value)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, str(error)))
        span.record_exception(error)
    span.end()
