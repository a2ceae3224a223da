#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace receiver for the tests, independent of Lockstep's
exporter: the `opentelemetry-proto` package's generated service, served with
`grpcio`.

    python3 otlp_receiver.py <spans.jsonl>

Listens on a free port of 127.0.0.1, prints `OTLP_LISTENING <port>` on stdout
(and writes the port to <spans.jsonl>.port),
and appends one JSON object per received span to <spans.jsonl>:
{"service", "trace_id", "span_id", "parent_span_id", "name", "kind",
 "attributes": {key: value as text}, "links": [{"trace_id", "span_id"}]}.
"""

import json
import sys
import threading
from concurrent import futures

try:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
except ImportError as e:
    sys.exit(f"needs grpcio and opentelemetry-proto ({e}): pip install grpcio opentelemetry-proto")


def value_text(value):
    kind = value.WhichOneof("value")
    return "" if kind is None else str(getattr(value, kind))


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def Export(self, request, context):
        lines = []
        for resource_spans in request.resource_spans:
            service = ""
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = value_text(attribute.value)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    lines.append(json.dumps({
                        "service": service,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "attributes": {a.key: value_text(a.value) for a in span.attributes},
                        "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()} for l in span.links],
                    }))
        with self.lock, open(self.path, "a", encoding="utf-8") as out:
            for line in lines:
                out.write(line + "\n")
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(sys.argv[1]), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"OTLP_LISTENING {port}", flush=True)
    with open(sys.argv[1] + ".port", "w", encoding="utf-8") as out:
        out.write(str(port))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
