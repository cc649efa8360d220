"""A minimal OTLP/gRPC trace collector for tests: the real protocol on 127.0.0.1, spans kept in memory."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True, slots=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict


@dataclass
class Collector:
    server: grpc.Server
    endpoint: str
    spans: list[CollectedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self) -> None:
        self.server.stop(grace=1)

    def in_trace(self, trace_id: str) -> list[CollectedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector_ref: list) -> None:
        self.collector_ref = collector_ref

    def Export(self, request, context):
        collector = self.collector_ref[0]
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    with collector.lock:
                        collector.spans.append(CollectedSpan(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                                             span.parent_span_id.hex(), attributes))
        return trace_service_pb2.ExportTraceServiceResponse()


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def start_collector() -> Collector:
    holder: list = []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(holder), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector = Collector(server, f"http://127.0.0.1:{port}")
    holder.append(collector)
    return collector
