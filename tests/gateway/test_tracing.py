"""One trace per request across gateway -> prefill -> both kvds -> decode, exported over OTLP/gRPC
(configured by the standard OTEL_* variables) into a real OTLP receiver run by this test
(opentelemetry-proto's TraceService). A client's `traceparent` is honoured: every span joins the
client's trace, with the parent/child structure and attributes checked."""

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
        p_node, d_node = s.node("node-p", env), s.node("node-d", env)
        prefill = s.worker("prefill", p_node, env=env)
        decode = s.worker("decode", d_node, env=env)
        url = s.gateway(["--pd-disaggregation", "--prefill", prefill, "--decode", decode],
                        env=env)
        yield receiver, url, prefill, decode
    finally:
        s.stop_all()
        server.stop(0)


EXPECTED = {  # span -> (service, parent span)
    "gateway.request": ("tandem-gateway", None),
    "gateway.route": ("tandem-gateway", "gateway.request"),
    "gateway.attempt": ("tandem-gateway", "gateway.request"),
    "prefill.request": ("tandem-prefill", "gateway.attempt"),
    "prefill.queue": ("tandem-prefill", "prefill.request"),
    "kvd.await_bootstrap": ("tandem-kvd", "prefill.queue"),
    "prefill.forward": ("tandem-prefill", "prefill.request"),
    "kv.transfer": ("tandem-prefill", "prefill.request"),
    "kvd.send": ("tandem-kvd", "kv.transfer"),
    "decode.request": ("tandem-decode", "gateway.attempt"),
    "decode.wait_for_kv": ("tandem-decode", "decode.request"),
    "kvd.expect": ("tandem-kvd", "decode.wait_for_kv"),
    "decode.generate": ("tandem-decode", "decode.request"),
}


def _attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind)
    return out


def test_one_trace_across_gateway_workers_and_kvds(traced):
    receiver, url, prefill, decode = traced
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    prompt = "trace me across every process"
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
                   json={"model": model, "prompt": prompt, "max_tokens": 5,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 20
    while True:
        with receiver.lock:
            ours = [(svc, s) for svc, s in receiver.spans if s.trace_id.hex() == TRACE_ID]
        names = {s.name for _, s in ours}
        if set(EXPECTED) <= names:
            break
        assert time.monotonic() < deadline, f"missing spans: {sorted(set(EXPECTED) - names)}"
        time.sleep(0.1)
    assert len(ours) == len(EXPECTED), sorted(s.name for _, s in ours)  # one attempt, no extras
    by_name = {s.name: (svc, s) for svc, s in ours}
    for name, (service, parent) in EXPECTED.items():
        svc, span = by_name[name]
        assert svc == service, (name, svc)
        want = bytes.fromhex(CLIENT_SPAN) if parent is None else by_name[parent][1].span_id
        assert span.parent_span_id == want, (name, parent)
        assert span.status.code != 2, (name, span.status.message)  # STATUS_CODE_ERROR
    route = _attrs(by_name["gateway.route"][1])
    assert route["tandem.prefill.url"] == prefill and route["tandem.decode.url"] == decode
    room = _attrs(by_name["gateway.attempt"][1])["tandem.room"]
    assert len(room) == 32
    transfer = _attrs(by_name["kv.transfer"][1])
    assert transfer["tandem.room"] == room and transfer["tandem.backend"] == "mooncake"
    assert transfer["tandem.kv_bytes"] > 0 and transfer["tandem.pages"] > 0
    assert transfer["tandem.gbps"] > 0 and "tandem.queue_shard" in transfer
    assert _attrs(by_name["kvd.send"][1])["tandem.kv_bytes"] == transfer["tandem.kv_bytes"]
    assert _attrs(by_name["kvd.expect"][1])["tandem.kv_bytes"] == transfer["tandem.kv_bytes"]
    forward = _attrs(by_name["prefill.forward"][1])
    assert forward["tandem.prompt_tokens"] == len(prompt.encode())  # byte-level tokenizer
    assert _attrs(by_name["decode.generate"][1])["tandem.output_tokens"] == 5
    request = _attrs(by_name["gateway.request"][1])
    assert request["http.status_code"] == 200 and request["gen_ai.request.model"] == model


def test_errors_set_span_status(traced):
    """A prompt longer than the context: the workers refuse it (400), and the spans of that
    trace that saw the failure carry status ERROR with the reason."""
    receiver, url, _, _ = traced
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"},
                   json={"model": model, "prompt": "x" * 600, "max_tokens": 4})
    assert r.status_code == 400, r.text
    wanted = {"gateway.request", "gateway.attempt", "decode.request"}
    deadline = time.monotonic() + 20
    while True:
        with receiver.lock:
            ours = {s.name: s for _, s in receiver.spans if s.trace_id.hex() == trace_id}
        if wanted <= set(ours):
            break
        assert time.monotonic() < deadline, f"spans received: {sorted(ours)}"
        time.sleep(0.1)
    for name in wanted:
        assert ours[name].status.code == 2, (name, ours[name].status)  # STATUS_CODE_ERROR
    assert "600" in ours["gateway.request"].status.message
