"""Every Prometheus metric of the service, declared here and nowhere else, on the registry ``GET /metrics`` serves.

Names are in base units (seconds, bytes) under one prefix, ``alex_``; the two GenAI histograms keep the names and
buckets of the OpenTelemetry GenAI semantic conventions so that shared dashboards work unchanged. Labels are bounded:
route templates, event types, tools, models, outcomes and reasons from fixed lists; never a session, task or user id.
docs/operations.md explains each one and what to do when it moves.

SSE streams (``GET /api/sse``)
    ``alex_sse_connections_active``                 gauge      streams open now
    ``alex_sse_connections_limit``                  gauge      ``ALEX_MAX_STREAMS``: more are refused with 503
    ``alex_sse_connections_opened_total``           counter    streams opened
    ``alex_sse_connections_closed_total``           counter    {reason}: client_gone, slow_client, draining,
                                                               session_deleted, stalled, redis_unavailable,
                                                               store_unavailable
    ``alex_sse_connections_rejected_total``         counter    {reason}: client_cap, server_cap
    ``alex_sse_events_sent_total``                  counter    {event_type}: events written to streams
    ``alex_sse_events_dropped_total``               counter    {reason}: slow_client (buffer overflow), stalled
                                                               (a write that never finished)
    ``alex_sse_bytes_sent_total``                   counter    bytes of event frames written
    ``alex_sse_time_to_first_event_seconds``        histogram  request arrival to the stream's first frame
    ``alex_sse_delivery_latency_seconds``           histogram  live event appended to written on a stream
    ``alex_sse_connection_duration_seconds``        histogram  how long streams stay open

Tasks
    ``alex_tasks_submitted_total``                  counter    tasks accepted
    ``alex_tasks_in_progress``                      gauge      tasks queued or running here
    ``alex_tasks_finished_total``                   counter    {outcome}: completed, failed, cancelled, interrupted
    ``alex_task_duration_seconds``                  histogram  {outcome}: start of the run to its end
    ``alex_task_queue_wait_seconds``                histogram  accepted to started
    ``alex_task_iterations``                        histogram  ReAct iterations per finished task
    ``alex_iterations_total``                       counter    ReAct iterations started
    ``alex_iteration_duration_seconds``             histogram  one iteration: the model's turn and its tools

Model (GenAI)
    ``gen_ai_client_operation_duration_seconds``    histogram  {gen_ai_operation_name, gen_ai_provider_name,
                                                               gen_ai_request_model, error_type}
    ``gen_ai_client_token_usage``                   histogram  {gen_ai_operation_name, gen_ai_provider_name,
                                                               gen_ai_request_model, gen_ai_token_type}
    ``alex_llm_time_to_first_chunk_seconds``        histogram  {model}: request sent to its first streamed chunk
    ``alex_llm_errors_total``                       counter    {model, error_type}

Tools
    ``alex_tool_calls_total``                       counter    {tool, outcome}: ok, error, cancelled
    ``alex_tool_duration_seconds``                  histogram  {tool}

HTTP (not the streams: their lifetime is not request latency)
    ``alex_http_requests_total``                    counter    {method, route, status}; streams included
    ``alex_http_request_duration_seconds``          histogram  {method, route}; streams excluded
    ``alex_http_requests_in_flight``                gauge      non-streaming requests being served

Security and the process
    ``alex_auth_failures_total``                    counter    {reason}
    ``alex_rate_limit_rejections_total``            counter    {route}: route template
    ``alex_event_loop_lag_seconds``                 gauge      how late a timer fired on the event loop, last check
    ``alex_build_info``                             gauge      {version, python_version, provider, model}: 1
    ``process_*``, ``python_*``                     the client library's process and runtime collectors
"""

from __future__ import annotations

import asyncio
import platform
from bisect import bisect_left
from collections.abc import Iterable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from service.domain.events import EVENT_TYPES

PREFIX = "alex"

# Stream and request latencies: a millisecond to a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Things that last as long as an agent works: a tenth of a second to an hour.
LONG_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# The OpenTelemetry GenAI conventions' advice for gen_ai.client.operation.duration and gen_ai.client.token.usage.
GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
GENAI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
ITERATION_BUCKETS = (1, 2, 3, 5, 8, 13, 20, 30, 50, 100)

SSE_CLOSE_REASONS = ("client_gone", "slow_client", "draining", "session_deleted", "stalled", "redis_unavailable",
                     "store_unavailable")
SSE_DROP_REASONS = ("slow_client", "stalled")
SSE_REJECT_REASONS = ("client_cap", "server_cap")
TASK_OUTCOMES = ("completed", "failed", "cancelled", "interrupted")
TOOL_OUTCOMES = ("ok", "error", "cancelled")
TOKEN_TYPES = ("input", "output")
LLM_ERROR_TYPES = ("timeout", "connection", "rate_limit", "auth", "bad_request", "server", "stream", "error")
"""The kinds of :class:`~service.domain.llm.LLMError` the adapters raise."""
AUTH_FAILURE_REASONS = (
    "missing_token", "malformed_header", "malformed_token", "bad_signature", "expired", "not_yet_valid",
    "wrong_issuer", "wrong_audience", "missing_claim", "algorithm_not_allowed", "unknown_key", "keys_unavailable",
    "insufficient_scope", "invalid",
)
UNKNOWN_TOOL = "unknown"
"""The ``tool`` label of a call to a tool the registry does not have (the model's name is not a bounded value)."""


class BatchHistogram(Histogram):
    """A histogram (without labels) that also takes many observations at once (:meth:`observe_many`): one lock per
    bucket touched and one for the sum, where ``observe`` takes two per value. The delivery latency gets a sample
    per event; under load that is thousands a second, each of which cost more than writing its frame to a stream.
    """

    def observe_many(self, amounts: Iterable[float]) -> None:
        """``observe`` each of ``amounts``: the same buckets, count and sum."""
        if self._labelnames and not self._labelvalues:
            raise ValueError(f"{self._name} has labels: observe on a child from labels()")
        bounds = self._upper_bounds
        counts = [0] * len(bounds)
        total = 0.0
        for amount in amounts:
            counts[bisect_left(bounds, amount)] += 1  # the first bound at or above it, as observe() finds it
            total += amount
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._sum.inc(total)


M = TypeVar("M", Counter, Gauge, Histogram)


class Series(Generic[M]):
    """A labelled metric's series, each resolved once and kept: ``labels()`` takes a lock and checks its arguments
    on every call, and the engine and the request telemetry ask for the same few series several times per task.
    Labels are bounded (see the module's docstring), so what is kept is too."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """The service's metrics on their own registry (a fresh one per application, so tests never share counts)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        # A ``*_created`` series per counter and histogram doubles what every scrape carries, and nothing here
        # reads it (Prometheus finds resets on its own). The switch is the client library's, process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # SSE
        self.sse_connections_active = Gauge(
            f"{PREFIX}_sse_connections_active", "Event streams open now.", registry=r)
        self.sse_connections_limit = Gauge(
            f"{PREFIX}_sse_connections_limit", "Event streams this process accepts (ALEX_MAX_STREAMS).", registry=r)
        self.sse_connections_opened = Counter(
            f"{PREFIX}_sse_connections_opened", "Event streams opened.", registry=r)
        self.sse_connections_closed = Counter(
            f"{PREFIX}_sse_connections_closed", "Event streams closed, by why they ended.", ["reason"], registry=r)
        self.sse_connections_rejected = Counter(
            f"{PREFIX}_sse_connections_rejected", "Event streams refused because a cap was reached.", ["reason"],
            registry=r)
        self.sse_events_sent = Counter(
            f"{PREFIX}_sse_events_sent", "Events written to streams (one per event per stream).", ["event_type"],
            registry=r)
        self.sse_events_dropped = Counter(
            f"{PREFIX}_sse_events_dropped", "Events a stream lost (the client resumes them with Last-Event-ID).",
            ["reason"], registry=r)
        self.sse_bytes_sent = Counter(
            f"{PREFIX}_sse_bytes_sent", "Bytes of event frames written to streams.", registry=r)
        self.sse_time_to_first_event = Histogram(
            f"{PREFIX}_sse_time_to_first_event_seconds",
            "From a stream request's arrival to its first frame written.", buckets=LATENCY_BUCKETS, registry=r)
        self.sse_delivery_latency = BatchHistogram(
            f"{PREFIX}_sse_delivery_latency_seconds",
            "From a live event's append to its frame written on a stream.", buckets=LATENCY_BUCKETS, registry=r)
        self.sse_connection_duration = Histogram(
            f"{PREFIX}_sse_connection_duration_seconds", "How long event streams stay open.", buckets=LONG_BUCKETS,
            registry=r)

        # Tasks
        self.tasks_submitted = Counter(f"{PREFIX}_tasks_submitted", "Tasks accepted.", registry=r)
        self.tasks_in_progress = Gauge(
            f"{PREFIX}_tasks_in_progress", "Tasks queued or running in this process.", registry=r)
        self.tasks_finished = Counter(
            f"{PREFIX}_tasks_finished", "Tasks finished, by outcome.", ["outcome"], registry=r)
        self.task_duration = Histogram(
            f"{PREFIX}_task_duration_seconds", "From a task's start to its end, by outcome.", ["outcome"],
            buckets=LONG_BUCKETS, registry=r)
        self.task_queue_wait = Histogram(
            f"{PREFIX}_task_queue_wait_seconds", "From a task's acceptance to its start.", buckets=LATENCY_BUCKETS,
            registry=r)
        self.task_iterations = Histogram(
            f"{PREFIX}_task_iterations", "ReAct iterations per finished task.", buckets=ITERATION_BUCKETS,
            registry=r)
        self.iterations = Counter(f"{PREFIX}_iterations", "ReAct iterations started.", registry=r)
        self.iteration_duration = Histogram(
            f"{PREFIX}_iteration_duration_seconds", "One ReAct iteration: the model's turn and the tools it called.",
            buckets=LONG_BUCKETS, registry=r)

        # Model
        genai = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI operation duration (OpenTelemetry GenAI conventions).",
            [*genai, "error_type"], buckets=GENAI_DURATION_BUCKETS, registry=r)
        self.genai_tokens = Histogram(
            "gen_ai_client_token_usage", "Tokens used per GenAI operation (OpenTelemetry GenAI conventions).",
            [*genai, "gen_ai_token_type"], buckets=GENAI_TOKEN_BUCKETS, registry=r)
        self.llm_time_to_first_chunk = Histogram(
            f"{PREFIX}_llm_time_to_first_chunk_seconds", "From a model request to its first streamed chunk.",
            ["model"], buckets=GENAI_DURATION_BUCKETS, registry=r)
        self.llm_errors = Counter(
            f"{PREFIX}_llm_errors", "Model calls that failed after the adapter's retries, by error type.",
            ["model", "error_type"], registry=r)

        # Tools
        self.tool_calls = Counter(
            f"{PREFIX}_tool_calls", "Tool calls, by tool and outcome.", ["tool", "outcome"], registry=r)
        self.tool_duration = Histogram(
            f"{PREFIX}_tool_duration_seconds", "Tool call duration, by tool.", ["tool"], buckets=LONG_BUCKETS,
            registry=r)

        # HTTP
        self.http_requests = Counter(
            f"{PREFIX}_http_requests", "HTTP requests, by route template, method and status.",
            ["method", "route", "status"], registry=r)
        self.http_request_duration = Histogram(
            f"{PREFIX}_http_request_duration_seconds", "HTTP request duration (event streams excluded).",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_requests_in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight", "HTTP requests being served (event streams excluded).", registry=r)

        # Security and the process
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures", "Requests refused by authentication or authorisation, by reason.", ["reason"],
            registry=r)
        self.rate_limit_rejections = Counter(
            f"{PREFIX}_rate_limit_rejections", "Requests refused by a rate limit, by route template.", ["route"],
            registry=r)
        self.event_loop_lag = Gauge(
            f"{PREFIX}_event_loop_lag_seconds", "How late a timer fired on the event loop at the last check.",
            registry=r)
        self.build_info = Gauge(
            f"{PREFIX}_build_info", "Always 1; the labels say what runs.",
            ["version", "python_version", "provider", "model"], registry=r)

        self._keep_series()

        for reason in SSE_CLOSE_REASONS:
            self.sse_connections_closed.labels(reason)
        for reason in SSE_DROP_REASONS:
            self.sse_events_dropped.labels(reason)
        for reason in SSE_REJECT_REASONS:
            self.sse_connections_rejected.labels(reason)
        # Resolved once: a stream counts every write, and ``labels()`` costs a lock and a lookup each time.
        self.sse_sent_by_type = {t.event_type: self.sse_events_sent.labels(t.event_type) for t in EVENT_TYPES}
        for outcome in TASK_OUTCOMES:
            self.tasks_finished.labels(outcome)
            self.task_duration.labels(outcome)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)

    def _keep_series(self) -> None:
        """The series the hot paths record into (see :class:`Series`)."""
        self.tasks_finished_by = Series(self.tasks_finished)
        self.task_duration_by = Series(self.task_duration)
        self.genai_duration_by = Series(self.genai_duration)
        self.genai_tokens_by = Series(self.genai_tokens)
        self.llm_time_to_first_chunk_by = Series(self.llm_time_to_first_chunk)
        self.tool_calls_by = Series(self.tool_calls)
        self.tool_duration_by = Series(self.tool_duration)
        self.http_requests_by = Series(self.http_requests)
        self.http_request_duration_by = Series(self.http_request_duration)

    def count_sent(self, event_type: str, count: int = 1) -> None:
        child = self.sse_sent_by_type.get(event_type)
        if child is None:
            child = self.sse_sent_by_type[event_type] = self.sse_events_sent.labels(event_type)
        child.inc(count)

    def describe_build(self, version: str, provider: str, model: str) -> None:
        self.build_info.labels(version, platform.python_version(), provider, model).set(1)

    def prepare_tools(self, tools: Iterable[str]) -> None:
        for tool in (*tools, UNKNOWN_TOOL):
            self.tool_duration.labels(tool)
            for outcome in TOOL_OUTCOMES:
                self.tool_calls.labels(tool, outcome)

    def prepare_model(self, provider: str, model: str) -> None:
        self.llm_time_to_first_chunk.labels(model)
        self.genai_duration.labels("chat", provider, model, "")
        for token_type in TOKEN_TYPES:
            self.genai_tokens.labels("chat", provider, model, token_type)
        for kind in LLM_ERROR_TYPES:
            self.llm_errors.labels(model, kind)

    def prepare_routes(self, routes: Iterable[tuple[str, str]]) -> None:
        """Pre-create the series of each (method, route template) so dashboards show zeros, not gaps."""
        for method, route in routes:
            self.http_request_duration.labels(method, route)
            if route.startswith("/api/"):
                self.rate_limit_rejections.labels(route)


async def watch_event_loop(gauge: Gauge, interval: float = 1.0) -> None:
    """Every ``interval`` seconds, set ``gauge`` to how late the loop woke this task: a loop busy with work that
    never yields (or a blocking call) shows here before it shows anywhere else."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(interval)
        gauge.set(max(0.0, loop.time() - before - interval))
