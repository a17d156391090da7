"""What tracing costs a request when it is off, on this CPU.

    .venv/bin/python -m bench.tracing_off_cpu [--out bench/results/tracing_off_cpu.json]

With no OTLP endpoint configured, every tracing call on the request path returns at once after
testing `tracing.enabled()`. This times each such call (best of 5 runs of 200,000 calls, in
this process, tracing off) and adds them up for one PD request as the code makes them: the
gateway (request span, route and attempt spans, metadata for two legs, their ends), the prefill
worker (server span, three child spans, two kvd metadata, attribute sets), the decode worker
(server span, two explicit spans, metadata, ends) and the kvds (three server spans). The sum is
compared with the gateway's own added latency and a request's latency measured in
bench/results/serving_cpu.json on this machine (goal: well under 1% of either).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from services.bench.report import machine_info
from services.common import tracing
from services.gateway import spans

RUNS, CALLS = 5, 200_000


class _Ctx:  # what a grpc servicer context offers the tracing helpers
    def invocation_metadata(self):
        return ()


def _best_ns(fn) -> float:
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter_ns()
        for _ in range(CALLS):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / CALLS)
    return best


def _with_span() -> None:
    with tracing.span("x", a=1):
        pass


_CTX = _Ctx()


def _with_server_span() -> None:
    with tracing.server_span("x", _CTX, a=1):
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/tracing_off_cpu.json")
    p.add_argument("--serving", default="bench/results/serving_cpu.json")
    args = p.parse_args()
    assert not tracing.enabled(), "run without OTEL_EXPORTER_OTLP_ENDPOINT: this measures 'off'"
    per_call = {
        "request_span": _best_ns(lambda: spans.request_span("x", {}, {"a": 1})),
        "attempt_spans": _best_ns(lambda: spans.attempt_spans(None, 0, [], {})),
        "gateway_metadata": _best_ns(lambda: tracing.metadata_for(None)),
        "gateway_end": _best_ns(lambda: tracing.end_span(None)),
        "server_span": _best_ns(_with_server_span),
        "span": _best_ns(_with_span),
        "start_span": _best_ns(lambda: tracing.start_span("x", None, attributes={"a": 1})),
        "end_span": _best_ns(lambda: tracing.end_span(None, None, a=1)),
        "metadata_for": _best_ns(lambda: tracing.metadata_for(None)),
        "grpc_metadata": _best_ns(tracing.grpc_metadata),
        "set_attributes": _best_ns(lambda: tracing.set_attributes(None, a=1)),
    }
    # calls one PD request makes (one attempt), counted from the code paths
    calls = {"request_span": 1, "attempt_spans": 1, "gateway_metadata": 1, "gateway_end": 2,
             "server_span": 1 + 3, "span": 3, "start_span": 3, "end_span": 3,
             "metadata_for": 1, "grpc_metadata": 2, "set_attributes": 5}
    total_ns = sum(per_call[k] * n for k, n in calls.items())
    result = {"machine": machine_info(), "tracing": "off (no OTLP endpoint)",
              "ns_per_call": per_call, "calls_per_pd_request": calls,
              "ns_per_pd_request": total_ns}
    serving = Path(args.serving)
    if serving.exists():
        pd = json.loads(serving.read_text())["pd_1p1d"]["gateway_overhead"]
        added_ms, request_ms = pd["added_ms"]["p50"], pd["gateway_ms"]["p50"]
        result["compared_with"] = {
            "source": str(serving), "gateway_added_p50_ms": added_ms,
            "request_p50_ms": request_ms,
            "share_of_gateway_added": total_ns / 1e6 / added_ms,
            "share_of_request": total_ns / 1e6 / request_ms}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
