"""OpenTelemetry tracing: the tracer provider, the W3C trace context, and each task's place in its trace.

Spans leave the process only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is
set: then they go to that OTLP/HTTP receiver in batches from a background thread. When it is not set, spans are
still made, without being recorded (the sampler says no), so trace and span ids exist for events and log lines and
are passed on, at the cost of two random numbers a span.

The span tree of a task (docs/operations.md, "Traces")::

    POST /api/tasks                      SERVER   (continues the caller's traceparent)
    └── invoke_agent                     INTERNAL (the whole run)
        └── iteration                    INTERNAL (alex.iteration = 1, 2, ...)
            ├── chat {model}             CLIENT   (one model call)
            └── execute_tool {name}      INTERNAL (one per tool call)
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import __version__
from service.config import Settings

TRACER_NAME = "alex-server"
_PROPAGATOR = TraceContextTextMapPropagator()


def build_tracer_provider(settings: Settings, exporter: SpanExporter | None = None) -> TracerProvider:
    """The process's tracer provider; ``exporter`` (tests pass an in-memory one) wins over the OTLP settings."""
    resource = Resource.create({"service.name": settings.otel_service_name, "service.version": __version__})
    if exporter is None and settings.otlp_traces_url is not None:
        # Imported here: the exporter pulls in protobuf and an HTTP stack that an unexported service never needs.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        exporter = OTLPSpanExporter(endpoint=settings.otlp_traces_url)
    if exporter is None:
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    sampler = ParentBased(TraceIdRatioBased(settings.otel_traces_sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def extract_context(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context a request carries in ``traceparent``/``tracestate`` (an empty one when it has none or a
    malformed one: a bad header starts a new trace, it never fails the request)."""
    return _PROPAGATOR.extract(headers)


def format_trace_id(trace_id: int) -> str:
    return format(trace_id, "032x")


def format_span_id(span_id: int) -> str:
    return format(span_id, "016x")


def continue_trace(trace_id: str) -> otel_context.Context:
    """A context whose spans join the trace ``trace_id`` (a task taken from the queue by another replica than the
    one its request reached: the trace goes on, under a remote parent standing for that request)."""
    try:
        number = int(trace_id, 16)
    except ValueError:
        number = 0
    if not number:
        return task_trace()[1]
    parent = SpanContext(number, secrets.randbits(64) or 1, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent), otel_context.Context())


def task_trace() -> tuple[str, otel_context.Context]:
    """The trace a new task joins: the current one (the ``POST /api/tasks`` span), with its id.

    Without a current span (a task not started by a request), a new trace id is made, and the returned context
    holds it as a remote parent so that the task's spans carry that id too.
    """
    current = otel_context.get_current()
    span_context = trace.get_current_span(current).get_span_context()
    if span_context.is_valid:
        return format_trace_id(span_context.trace_id), current
    trace_id = secrets.randbits(128) or 1
    parent = SpanContext(trace_id, secrets.randbits(64) or 1, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return format_trace_id(trace_id), trace.set_span_in_context(NonRecordingSpan(parent), current)
