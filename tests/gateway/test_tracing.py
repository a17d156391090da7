"""Traces leave the gateway over OTLP/gRPC, configured by the standard OTEL_* variables, into a
real OTLP receiver run by this test (opentelemetry-proto's TraceService). A client's
`traceparent` is honoured: the gateway's spans join the client's trace."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.gateway.stack import Stack
from tests.procs import free_port
from tests.tiny_models import make_tiny_model

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service name, span)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, s) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    tmp = tmp_path_factory.mktemp("tracing")
    make_tiny_model("llama", tmp / "model")
    s = Stack(tmp, str(tmp / "model"))
    try:
        node = s.node("node")
        prefill, decode = s.worker("prefill", node), s.worker("decode", node)
        url = s.gateway(["--pd-disaggregation", "--prefill", prefill, "--decode", decode],
                        env=env)
        yield receiver, url, prefill, decode
    finally:
        s.stop_all()
        server.stop(0)


def test_gateway_spans_join_the_clients_trace(traced):
    receiver, url, prefill, decode = traced
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
                   json={"model": model, "prompt": "trace me", "max_tokens": 4})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 15
    while True:
        with receiver.lock:
            ours = [(svc, s) for svc, s in receiver.spans if s.trace_id.hex() == TRACE_ID]
        names = {s.name for _, s in ours}
        if {"gateway.request", "gateway.route", "gateway.attempt"} <= names:
            break
        assert time.monotonic() < deadline, f"spans received: {sorted(names)}"
        time.sleep(0.1)
    by_name = {s.name: (svc, s) for svc, s in ours}
    svc, request = by_name["gateway.request"]
    assert svc == "tandem-gateway"
    assert request.parent_span_id.hex() == CLIENT_SPAN  # joined the client's trace
    for child in ("gateway.route", "gateway.attempt"):
        assert by_name[child][1].parent_span_id == request.span_id
    attrs = {a.key: a.value for a in by_name["gateway.route"][1].attributes}
    assert attrs["tandem.prefill.url"].string_value == prefill
    assert attrs["tandem.decode.url"].string_value == decode
    attempt = {a.key: a.value for a in by_name["gateway.attempt"][1].attributes}
    assert len(attempt["tandem.room"].string_value) == 32
    route_attrs = {a.key for a in request.attributes}
    assert {"http.route", "gen_ai.request.model", "http.status_code"} <= route_attrs
