"""A minimal OTLP/gRPC trace receiver for deploy/docker_test.sh, standing in for Jaeger (no
registry to pull it from here): listens on :4317 and prints one JSON line per span received
(`service`, `name`, `trace_id`, `parent`)."""

import json
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    print(json.dumps({"service": service, "name": span.name,
                                      "trace_id": span.trace_id.hex(),
                                      "parent": span.parent_span_id.hex()}), flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


server = grpc.server(futures.ThreadPoolExecutor(4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
server.add_insecure_port("0.0.0.0:4317")
server.start()
print("otlp receiver listening on :4317", flush=True)
server.wait_for_termination()
