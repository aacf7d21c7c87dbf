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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

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


@contextmanager
def _failures_recorded(span: Span) -> Iterator[None]:
    """End ``span`` as failed when an exception leaves the block: cancelled, a model error, or a bug."""
    try:
        yield
    except BaseException as exc:
        _fail(span, _error_type(exc), "" if isinstance(exc, asyncio.CancelledError) else str(exc)[:200])
        raise


class _TaskScope:
    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def finish(self, outcome: str, iterations: int, error_kind: str | None) -> None:
        self._span.set_attribute("alex.task.outcome", outcome)
        self._span.set_attribute("alex.task.iterations", iterations)
        if error_kind is not None:
            _fail(self._span, error_kind)


class _ChatScope:
    __slots__ = ("_content", "_span", "response")

    def __init__(self, span: Span, content: bool) -> None:
        self._span = span
        self._content = content
        self.response: ChatResponse | None = None

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
        if self._content:
            output = {"role": "assistant", "content": response.content,
                      "tool_calls": [call.to_dict() for call in response.tool_calls]}
            span.set_attribute("gen_ai.output.messages", json.dumps([output], ensure_ascii=False))


class _ToolScope:
    __slots__ = ("_content", "_span", "error")

    def __init__(self, span: Span, content: bool) -> None:
        self._span = span
        self._content = content
        self.error: str | None = None

    def finish(self, result: str, error: str | None) -> None:
        self.error = error
        if self._content:
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

    @contextmanager
    def task(self, session_id: str, task_id: str, text: str) -> Iterator[_TaskScope]:
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
        with self._tracer.start_as_current_span("invoke_agent", kind=SpanKind.INTERNAL, attributes=attributes,
                                                record_exception=False, set_status_on_exception=False) as span, \
                _failures_recorded(span):
            yield _TaskScope(span)

    @contextmanager
    def iteration(self, number: int) -> Iterator[None]:
        self._metrics.iterations.inc()
        started = time.perf_counter()
        try:
            with self._tracer.start_as_current_span("iteration", kind=SpanKind.INTERNAL,
                                                    attributes={"alex.iteration": number}, record_exception=False,
                                                    set_status_on_exception=False) as span, _failures_recorded(span):
                yield
        finally:
            self._metrics.iteration_duration.observe(time.perf_counter() - started)

    @contextmanager
    def chat(self, messages: Sequence[Message]) -> Iterator[_ChatScope]:
        model, metrics = self._model, self._metrics
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._provider,
            "gen_ai.request.model": model,
        }
        if self._content:
            attributes["gen_ai.input.messages"] = json.dumps([m.to_dict() for m in messages], ensure_ascii=False)
        started = time.perf_counter()
        error_type = ""
        scope: _ChatScope | None = None
        try:
            with self._tracer.start_as_current_span(f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes,
                                                    record_exception=False, set_status_on_exception=False) as span, \
                    _failures_recorded(span):
                scope = _ChatScope(span, self._content)
                yield scope
        except BaseException as exc:
            error_type = _error_type(exc)
            if isinstance(exc, LLMError):
                metrics.llm_errors.labels(model, exc.kind).inc()
            raise
        finally:
            metrics.genai_duration.labels("chat", self._provider, model, error_type).observe(
                time.perf_counter() - started)
            response = scope.response if scope is not None else None
            if response is not None:
                tokens = metrics.genai_tokens
                tokens.labels("chat", self._provider, model, "input").observe(response.usage.prompt_tokens)
                tokens.labels("chat", self._provider, model, "output").observe(response.usage.completion_tokens)
                if response.first_chunk_seconds is not None:
                    metrics.llm_time_to_first_chunk.labels(model).observe(response.first_chunk_seconds)

    @contextmanager
    def tool(self, call: ToolCall, arguments: Mapping[str, Any]) -> Iterator[_ToolScope]:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": call.name,
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
        }
        if self._content:
            attributes["gen_ai.tool.call.arguments"] = json.dumps(dict(arguments), ensure_ascii=False, default=str)
        label = call.name if call.name in self._tools else UNKNOWN_TOOL
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            with self._tracer.start_as_current_span(f"execute_tool {label}", kind=SpanKind.INTERNAL,
                                                    attributes=attributes, record_exception=False,
                                                    set_status_on_exception=False) as span, _failures_recorded(span):
                scope = _ToolScope(span, self._content)
                yield scope
                outcome = "ok" if scope.error is None else "error"
        finally:
            self._metrics.tool_calls.labels(label, outcome).inc()
            self._metrics.tool_duration.labels(label).observe(time.perf_counter() - started)
