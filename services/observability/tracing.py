"""OpenTelemetry traces across Gateway -> Perception -> Decision -> Reaction.

Each process sets up tracing once, when its service starts. Spans are exported over OTLP/gRPC when
OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, with the standard OTEL_*
variables for headers, TLS and batching; otherwise nothing is recorded or sent. A client's W3C
`traceparent` gRPC metadata becomes the parent of its session's spans; between services the context
travels in the internal messages' `trace_context` map under the same W3C keys.

Traces: one per frame (gateway `frame` from receipt to decision, `perception.encode`, `decision.decide`
from push to decision) and, for a reply, `decision.reply` and `reaction.respond` under the frame (or
query) that triggered it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_configured = False


def tracer(service: str) -> trace.Tracer:
    """The tracer for `service` ("gateway", "perception", ...); sets up export on first use."""
    global _configured
    with _lock:
        if not _configured:
            _configured = True
            _configure(service)
    return trace.get_tracer("liveserve")


def _configure(service: str) -> None:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return  # the API's default provider: spans are not recorded, nothing is exported
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"liveserve-{service}",
                                                        "service.namespace": "liveserve"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("exporting traces over OTLP to %s", endpoint)


def inject(carrier: MutableMapping[str, str], span: trace.Span | None = None) -> None:
    """Write `span`'s context (default: the current one) into `carrier` (a message's trace_context)."""
    context = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(carrier, context=context)


def extract(carrier: Mapping[str, str] | Iterable[tuple[str, str]]) -> otel_context.Context:
    """The context a message (or gRPC metadata) carries; an empty one when it carries none."""
    return _propagator.extract(dict(carrier))


def carried(span: trace.Span) -> tuple[tuple[str, str], ...]:
    """`span`'s W3C context as (key, value) pairs for an internal message, or () when the span is not
    recorded (tracing off): the services then record nothing for it either."""
    if not span.is_recording():
        return ()
    carrier: dict[str, str] = {}
    inject(carrier, span)
    return tuple(carrier.items())


def flush() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush(timeout_millis=5000)
