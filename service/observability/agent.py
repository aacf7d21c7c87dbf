"""The engine's observer (:class:`~service.domain.telemetry.Telemetry`): a span and metrics for every step of a run.

Spans follow the OpenTelemetry GenAI semantic conventions (``invoke_agent``, ``chat {model}``,
``execute_tool {name}``, ``gen_ai.*`` attributes), with one ``iteration`` span per ReAct iteration between the
agent and its model and tool calls. Message, answer and argument content goes on spans only with
``ALEX_TRACE_CONTENT=true``: it may hold personal data and secrets a user pasted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from service.domain.llm import ChatResponse, LLMError, Message, ToolCall
from service.observability.metrics import UNKNOWN_TOOL, Metrics

AGENT_NAME = "alex"
CANCELLED = "cancelled"


def _fail(span: Span, error_type: str, description: str = "") -> None:
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, description or error_type))


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return CANCELLED
    if isinstance(exc, LLMError):
        return exc.kind
    return type(exc).__qualname__


class _SpanScope:
    """A span that is current for a ``with`` block and ended with it, marked failed when an exception leaves the
    block (cancelled, a model error, or a bug); exceptions are not recorded as span events.

    What ``start_as_current_span`` and a failure-recording wrapper did together, as one plain object: the engine
    opens four of these per iteration, and two generator-based context managers each cost more than the span.
    """

    __slots__ = ("_span", "_token")

    def _open(self, tracer: Tracer, name: str, kind: SpanKind, attributes: dict[str, Any]) -> Span:
        span = self._span = tracer.start_span(name, kind=kind, attributes=attributes, record_exception=False,
                                              set_status_on_exception=False)
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def _close(self, exc: BaseException | None) -> None:
        try:
            if exc is not None:
                _fail(self._span, _error_type(exc), "" if isinstance(exc, asyncio.CancelledError) else str(exc)[:200])
        finally:
            otel_context.detach(self._token)
            self._span.end()


class _TaskScope(_SpanScope):
    __slots__ = ("_attributes", "_tracer")

    def __init__(self, tracer: Tracer, attributes: dict[str, Any]) -> None:
        self._tracer = tracer
        self._attributes = attributes

    def __enter__(self) -> _TaskScope:
        self._open(self._tracer, "invoke_agent", SpanKind.INTERNAL, self._attributes)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._close(exc)

    def finish(self, outcome: str, iterations: int, error_kind: str | None) -> None:
        self._span.set_attribute("alex.task.outcome", outcome)
        self._span.set_attribute("alex.task.iterations", iterations)
        if error_kind is not None:
            _fail(self._span, error_kind)


class _IterationScope(_SpanScope):
    __slots__ = ("_metrics", "_number", "_started", "_tracer")

    def __init__(self, tracer: Tracer, metrics: Metrics, number: int) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self._number = number

    def __enter__(self) -> None:
        self._metrics.iterations.inc()
        self._started = time.perf_counter()
        self._open(self._tracer, "iteration", SpanKind.INTERNAL, {"alex.iteration": self._number})

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self._close(exc)
        finally:
            self._metrics.iteration_duration.observe(time.perf_counter() - self._started)


class _ChatScope(_SpanScope):
    __slots__ = ("_messages", "_owner", "_started", "response")

    def __init__(self, owner: AgentTelemetry, messages: Sequence[Message]) -> None:
        self._owner = owner
        self._messages = messages
        self.response: ChatResponse | None = None

    def __enter__(self) -> _ChatScope:
        owner = self._owner
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": owner._provider,
            "gen_ai.request.model": owner._model,
        }
        if owner._content:
            attributes["gen_ai.input.messages"] = json.dumps([m.to_dict() for m in self._messages],
                                                             ensure_ascii=False)
        self._started = time.perf_counter()
        self._open(owner._tracer, f"chat {owner._model}", SpanKind.CLIENT, attributes)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        owner = self._owner
        model, provider, metrics = owner._model, owner._provider, owner._metrics
        try:
            self._close(exc)
        finally:
            error_type = "" if exc is None else _error_type(exc)
            if isinstance(exc, LLMError):
                metrics.llm_errors.labels(model, exc.kind).inc()
            metrics.genai_duration_by("chat", provider, model, error_type).observe(
                time.perf_counter() - self._started)
            response = self.response
            if response is not None:
                tokens = metrics.genai_tokens_by
                tokens("chat", provider, model, "input").observe(response.usage.prompt_tokens)
                tokens("chat", provider, model, "output").observe(response.usage.completion_tokens)
                if response.first_chunk_seconds is not None:
                    metrics.llm_time_to_first_chunk_by(model).observe(response.first_chunk_seconds)

    def finish(self, response: ChatResponse) -> None:
        self.response = response
        span = self._span
        span.set_attribute("gen_ai.response.model", response.model)
        span.set_attribute("gen_ai.usage.input_tokens", response.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", response.usage.completion_tokens)
        if response.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [response.finish_reason])
        if response.first_chunk_seconds is not None:
            span.set_attribute("gen_ai.response.time_to_first_chunk", response.first_chunk_seconds)
        if self._owner._content:
            output = {"role": "assistant", "content": response.content,
                      "tool_calls": [call.to_dict() for call in response.tool_calls]}
            span.set_attribute("gen_ai.output.messages", json.dumps([output], ensure_ascii=False))


class _ToolScope(_SpanScope):
    __slots__ = ("_arguments", "_call", "_label", "_owner", "_started", "error")

    def __init__(self, owner: AgentTelemetry, call: ToolCall, arguments: Mapping[str, Any]) -> None:
        self._owner = owner
        self._call = call
        self._arguments = arguments
        self.error: str | None = None

    def __enter__(self) -> _ToolScope:
        owner, call = self._owner, self._call
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
        }
        if owner._content:
            attributes["gen_ai.tool.call.arguments"] = json.dumps(dict(self._arguments), ensure_ascii=False,
                                                                  default=str)
        self._label = call.name if call.name in owner._tools else UNKNOWN_TOOL
        self._started = time.perf_counter()
        self._open(owner._tracer, f"execute_tool {self._label}", SpanKind.INTERNAL, attributes)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        metrics = self._owner._metrics
        try:
            self._close(exc)
        finally:
            outcome = "cancelled" if exc is not None else "ok" if self.error is None else "error"
            metrics.tool_calls_by(self._label, outcome).inc()
            metrics.tool_duration_by(self._label).observe(time.perf_counter() - self._started)

    def finish(self, result: str, error: str | None) -> None:
        self.error = error
        if self._owner._content:
            self._span.set_attribute("gen_ai.tool.call.result", result if error is None else error)
        if error is not None:
            _fail(self._span, "tool_error", error[:200])


class AgentTelemetry:
    """Spans on ``tracer`` and samples in ``metrics`` for each task, iteration, model call and tool call."""

    def __init__(self, tracer: Tracer, metrics: Metrics, *, provider: str, model: str, tools: Iterable[str],
                 capture_content: bool = False) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self._provider = provider
        self._model = model
        self._tools = frozenset(tools)
        self._content = capture_content
        metrics.prepare_tools(self._tools)
        metrics.prepare_model(provider, model)

    def task(self, session_id: str, task_id: str, text: str) -> _TaskScope:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": AGENT_NAME,
            "gen_ai.provider.name": self._provider,
            "gen_ai.request.model": self._model,
            "gen_ai.conversation.id": session_id,
            "alex.task.id": task_id,
        }
        if self._content:
            attributes["gen_ai.input.messages"] = json.dumps([{"role": "user", "content": text}], ensure_ascii=False)
        return _TaskScope(self._tracer, attributes)

    def iteration(self, number: int) -> _IterationScope:
        return _IterationScope(self._tracer, self._metrics, number)

    def chat(self, messages: Sequence[Message]) -> _ChatScope:
        return _ChatScope(self, messages)

    def tool(self, call: ToolCall, arguments: Mapping[str, Any]) -> _ToolScope:
        return _ToolScope(self, call, arguments)
