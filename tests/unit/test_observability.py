"""The metric catalogue, the trace context a task joins, and the trace ids on log lines."""

from __future__ import annotations

import re

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry

from service.config import ConfigError, load_settings
from service.observability import metrics as metrics_module
from service.observability.logging import add_trace_ids
from service.observability.metrics import LATENCY_BUCKETS, BatchHistogram, Metrics
from service.observability.tracing import build_tracer_provider, extract_context, task_trace
from tests.unit.fakes import clear_settings_environment

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def families(metrics: Metrics) -> dict[str, str]:
    return {family.name: family.type for family in metrics.registry.collect()}


def test_every_metric_is_listed_in_the_module_docstring_and_nothing_else_is() -> None:
    doc = metrics_module.__doc__ or ""
    listed = set(re.findall(r"``((?:alex|gen_ai)_[a-z0-9_]+)``", doc))
    exposed = set()
    for name, kind in families(Metrics(process=False)).items():
        exposed.add(name + "_total" if kind == "counter" else name)
    assert exposed == listed


def test_names_have_one_prefix_and_base_units() -> None:
    for name in families(Metrics(process=False)):
        assert name.startswith(("alex_", "gen_ai_client_")), name
        assert not re.search(r"_(ms|milliseconds|kb|mb)(_|$)", name), name


def test_labels_of_known_values_exist_before_anything_happens() -> None:
    metrics = Metrics(process=False)
    metrics.prepare_tools(["bash"])
    metrics.prepare_routes([("POST", "/api/tasks")])
    get = metrics.registry.get_sample_value
    assert get("alex_sse_events_sent_total", {"event_type": "task_complete"}) == 0
    assert get("alex_sse_events_dropped_total", {"reason": "slow_client"}) == 0
    assert get("alex_tasks_finished_total", {"outcome": "interrupted"}) == 0
    assert get("alex_auth_failures_total", {"reason": "expired"}) == 0
    assert get("alex_tool_calls_total", {"tool": "bash", "outcome": "error"}) == 0
    assert get("alex_tool_calls_total", {"tool": "unknown", "outcome": "ok"}) == 0
    assert get("alex_http_request_duration_seconds_count", {"method": "POST", "route": "/api/tasks"}) == 0
    assert get("alex_rate_limit_rejections_total", {"route": "/api/tasks"}) == 0


def test_two_registries_never_share_counts() -> None:
    first, second = Metrics(process=False), Metrics(process=False)
    first.tasks_submitted.inc()
    assert second.registry.get_sample_value("alex_tasks_submitted_total") == 0


def test_a_task_joins_the_current_trace() -> None:
    parent = SpanContext(int(CALLER_TRACE, 16), int(CALLER_SPAN, 16), is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    try:
        trace_id, context = task_trace()
    finally:
        otel_context.detach(token)
    assert trace_id == CALLER_TRACE
    assert trace.get_current_span(context).get_span_context().span_id == int(CALLER_SPAN, 16)


def test_a_task_outside_any_trace_starts_its_own_and_its_spans_carry_its_id() -> None:
    first, context = task_trace()
    second, _ = task_trace()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("invoke_agent", context=context) as span:
        assert format(span.get_span_context().trace_id, "032x") == first


def test_a_traceparent_is_read_and_a_malformed_one_is_ignored() -> None:
    good = extract_context({"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"})
    assert format(trace.get_current_span(good).get_span_context().trace_id, "032x") == CALLER_TRACE
    bad = extract_context({"traceparent": "00-not-a-trace-01"})
    assert not trace.get_current_span(bad).get_span_context().is_valid


def test_log_lines_carry_the_current_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        line = add_trace_ids(None, "info", {"event": "x"})
        context = span.get_span_context()
    assert line == {"event": "x", "trace_id": format(context.trace_id, "032x"),
                    "span_id": format(context.span_id, "016x")}
    assert add_trace_ids(None, "info", {"event": "y"}) == {"event": "y"}


def test_a_log_line_outside_a_span_has_no_ids_and_the_pipeline_keeps_bound_context() -> None:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id="t_1")
    try:
        merged = structlog.contextvars.merge_contextvars(None, "info", {"event": "x"})
    finally:
        structlog.contextvars.clear_contextvars()
    assert add_trace_ids(None, "info", dict(merged)) == {"event": "x", "task_id": "t_1"}


def test_spans_are_made_but_not_recorded_without_an_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_environment(monkeypatch)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    provider = build_tracer_provider(load_settings())
    with provider.get_tracer("test").start_as_current_span("work") as span:
        assert span.get_span_context().is_valid
        assert not span.is_recording()


def test_an_otlp_endpoint_must_be_an_http_url(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_environment(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")
    with pytest.raises(ConfigError, match=r"^OTEL_EXPORTER_OTLP_ENDPOINT: "):
        load_settings()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    assert load_settings().otlp_traces_url == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://traces.example/otlp")
    assert load_settings().otlp_traces_url == "https://traces.example/otlp"


@pytest.mark.parametrize(("name", "value"), [
    ("ALEX_METRICS_PATH", "/api/metrics"),
    ("ALEX_METRICS_PATH", "metrics"),
    ("ALEX_METRICS_PATH", "/"),
    ("ALEX_METRICS_PORT", "70000"),
])
def test_a_bad_metrics_place_stops_the_start_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    clear_settings_environment(monkeypatch)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{name}: "):
        load_settings()


def test_the_metrics_port_must_not_be_the_main_one(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_settings_environment(monkeypatch)
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("ALEX_METRICS_PORT", "9000")
    with pytest.raises(ConfigError, match=r"^ALEX_METRICS_PORT: must differ from PORT"):
        load_settings()


def test_a_series_kept_by_the_metrics_records_into_the_labelled_series() -> None:
    metrics = Metrics(process=False)
    assert metrics.tool_calls_by("list_files", "ok") is metrics.tool_calls_by("list_files", "ok")
    metrics.tool_calls_by("list_files", "ok").inc()
    metrics.tool_calls.labels("list_files", "ok").inc()
    metrics.http_request_duration_by("POST", "/api/tasks").observe(0.002)
    sample = metrics.registry.get_sample_value
    assert sample("alex_tool_calls_total", {"tool": "list_files", "outcome": "ok"}) == 2
    assert sample("alex_http_request_duration_seconds_count", {"method": "POST", "route": "/api/tasks"}) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=120.0) | st.sampled_from(LATENCY_BUCKETS), max_size=50))
def test_many_observations_at_once_come_out_as_one_at_a_time(amounts: list[float]) -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    single = BatchHistogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=one)
    batch = BatchHistogram("h_seconds", "h", buckets=LATENCY_BUCKETS, registry=many)
    for amount in amounts:
        single.observe(amount)
    batch.observe_many(amounts)
    for bound in [*LATENCY_BUCKETS, float("inf")]:
        le = "+Inf" if bound == float("inf") else str(bound)
        expected = one.get_sample_value("h_seconds_bucket", {"le": le})
        assert expected is not None
        assert many.get_sample_value("h_seconds_bucket", {"le": le}) == expected, f"bucket le={le}"
    assert many.get_sample_value("h_seconds_count") == one.get_sample_value("h_seconds_count") == len(amounts)
    assert many.get_sample_value("h_seconds_sum") == pytest.approx(one.get_sample_value("h_seconds_sum"))


def test_many_observations_need_a_child_of_a_labelled_histogram() -> None:
    labelled = BatchHistogram("h_seconds", "h", ["route"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="has labels"):
        labelled.observe_many([0.1])
    labelled.labels("a").observe_many([0.1])
