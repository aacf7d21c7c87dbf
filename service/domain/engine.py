"""The ReAct engine: the model thinks, calls tools, reads their results, and goes on until it answers.

It knows nothing of HTTP, storage or any vendor: it drives a :class:`ChatModel` and a :class:`ToolRegistry` and
tells an :class:`EventSink` every step. Cancelling the task that awaits :meth:`ReactEngine.run` stops it at once
(the model request is aborted, tool processes are killed by the tools) and leaves the conversation consistent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from service.domain.events import (
    ErrorEvent,
    Event,
    IterationComplete,
    IterationStart,
    TaskAnalysis,
    TaskComplete,
    ThinkComplete,
    Thinking,
    ToolCallComplete,
    ToolCallStart,
    ToolCallStream,
)
from service.domain.history import trim_history
from service.domain.llm import ChatModel, LLMError, Message, ToolCall, ToolSpec, Usage
from service.domain.telemetry import NO_TELEMETRY, Telemetry
from service.domain.tools import TodoList, ToolContext, ToolError, ToolRegistry, parse_arguments

DEFAULT_SYSTEM_PROMPT = (
    "You are alex, an agent that completes tasks in a workspace folder. Think step by step. Use the tools to "
    "look at files, change them and run commands; read each result before the next step. Keep the todo list up "
    "to date on longer tasks. When the task is done, answer with the result and no tool call."
)


class EventSink(Protocol):
    """Takes every event the engine emits, in order. ``emit`` returns once the event is recorded."""

    async def emit(self, event: Event) -> None: ...


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_iterations: int = 20
    context_tokens: int = 100_000
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    analyze: bool = True
    """Emit ``task_analysis`` before the first iteration."""
    tool_result_limit: int = 64 * 1024
    """Characters of a tool's result that the model and the events get."""


@dataclass(frozen=True, slots=True)
class TaskRequest:
    session_id: str
    task_id: str
    text: str
    trace_id: str = ""


@dataclass(slots=True)
class Progress:
    """What a run has done so far, kept up to date as it goes: read it when a run is cancelled."""

    iterations: int = 0
    usage: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class TaskResult:
    outcome: Outcome
    final_answer: str | None = None
    iterations: int = 0
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    error_kind: str | None = None
    """A short, bounded label of the failure (``llm_timeout``, ``max_iterations``...), for metrics and logs."""
    duration_ms: int = 0


def summarize_goal(text: str, limit: int = 200) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[truncated: {len(text) - limit} more characters]"


class ReactEngine:
    def __init__(
        self,
        llm: ChatModel,
        tools: ToolRegistry,
        config: EngineConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._llm = llm
        self._tools = tools
        self._config = config or EngineConfig()
        self._clock = clock
        self._telemetry = telemetry

    async def run(
        self,
        request: TaskRequest,
        conversation: list[Message],
        sink: EventSink,
        *,
        workspace: Path,
        todos: TodoList,
        progress: Progress | None = None,
    ) -> TaskResult:
        """Run one task, continuing ``conversation`` (the session's messages so far), which it extends in place.

        Returns the outcome; emits ``task_complete``, or ``error`` when the model fails or the iterations run out.
        The caller handles cancellation (``asyncio.CancelledError`` propagates after the conversation is repaired).
        """
        run = _Run(self, request, conversation, sink, workspace=workspace, todos=todos, progress=progress)
        return await run.execute()


class _Run:
    """The state of one task's run: kept apart from the engine so that the engine is shared by every task."""

    def __init__(
        self,
        engine: ReactEngine,
        request: TaskRequest,
        conversation: list[Message],
        sink: EventSink,
        *,
        workspace: Path,
        todos: TodoList,
        progress: Progress | None,
    ) -> None:
        self.engine = engine
        self.config = engine._config
        self.request = request
        self.conversation = conversation
        self.sink = sink
        self.workspace = workspace
        self.todos = todos
        self.iteration: int | None = None
        self.progress = progress if progress is not None else Progress()
        self.started = engine._clock()
        self.telemetry = engine._telemetry

    @property
    def usage(self) -> Usage:
        return self.progress.usage

    def _envelope(self) -> dict[str, Any]:
        return {
            "session_id": self.request.session_id,
            "task_id": self.request.task_id,
            "trace_id": self.request.trace_id,
            "iteration": self.iteration,
        }

    async def _emit(self, event_type: type[Event], **fields: Any) -> None:
        await self.sink.emit(event_type(**self._envelope(), **fields))

    def _elapsed_ms(self) -> int:
        return int((self.engine._clock() - self.started) * 1000)

    async def execute(self) -> TaskResult:
        request = self.request
        with self.telemetry.task(request.session_id, request.task_id, request.text) as scope:
            try:
                result = await self._iterate()
            except asyncio.CancelledError:
                self._answer_open_calls("Error: the task was cancelled")
                raise
            scope.finish(result.outcome.value, result.iterations, result.error_kind)
            return result

    def _answer_open_calls(self, content: str) -> None:
        """Give every tool call of the last assistant turn a result: the model APIs refuse a conversation without."""
        for index in range(len(self.conversation) - 1, -1, -1):
            message = self.conversation[index]
            if message.role == "assistant":
                answered = {m.tool_call_id for m in self.conversation[index + 1:] if m.role == "tool"}
                for call in message.tool_calls:
                    if call.id not in answered:
                        self.conversation.append(Message("tool", content, tool_call_id=call.id, name=call.name))
                return
            if message.role == "user":
                return

    async def _iterate(self) -> TaskResult:
        if not self.conversation or self.conversation[0].role != "system":
            self.conversation.insert(0, Message("system", self.config.system_prompt))
        self.conversation.append(Message("user", self.request.text))
        if self.config.analyze:
            await self._emit(TaskAnalysis, action_name="Analyzing task", goal=summarize_goal(self.request.text))

        specs = self.engine._tools.specs()
        for number in range(1, self.config.max_iterations + 1):
            self.iteration = self.progress.iterations = number
            with self.telemetry.iteration(number):
                result = await self._step(number, specs)
            if result is not None:
                return result

        limit = self.config.max_iterations
        return await self._fail(f"no final answer after {limit} iterations (ALEX_MAX_ITERATIONS)", "max_iterations")

    async def _step(self, number: int, specs: list[ToolSpec]) -> TaskResult | None:
        """One iteration: the model's turn, then its tool calls. Returns the result when the task ended here."""
        await self._emit(IterationStart)
        window = trim_history(self.conversation, self.config.context_tokens)
        try:
            with self.telemetry.chat(window) as call:
                response = await self.engine._llm.chat(window, specs, self._on_text)
                call.finish(response)
        except LLMError as exc:
            return await self._fail(f"the model failed: {exc}", f"llm_{exc.kind}")
        self.progress.usage = self.progress.usage + response.usage
        self.conversation.append(Message("assistant", response.content, response.tool_calls))
        await self._emit(
            ThinkComplete,
            content=response.content,
            tool_calls=[{"call_id": c.id, "tool_name": c.name} for c in response.tool_calls],
        )
        if not response.tool_calls:
            await self._emit(IterationComplete, tokens_used=response.usage.total_tokens)
            duration = self._elapsed_ms()
            await self._emit(
                TaskComplete,
                final_answer=response.content,
                total_iterations=number,
                total_tokens=self.usage.total_tokens,
                duration=duration,
            )
            return TaskResult(Outcome.COMPLETED, response.content, number, self.usage, duration_ms=duration)
        await self._call_tools(response.tool_calls)
        await self._emit(IterationComplete, tokens_used=response.usage.total_tokens)
        return None

    async def _fail(self, error: str, kind: str) -> TaskResult:
        await self._emit(ErrorEvent, error=error, recoverable=False)
        return TaskResult(
            Outcome.FAILED,
            iterations=self.iteration or 0,
            usage=self.usage,
            error=error,
            error_kind=kind,
            duration_ms=self._elapsed_ms(),
        )

    async def _on_text(self, delta: str) -> None:
        if delta:
            await self._emit(Thinking, delta=delta)

    async def _call_tools(self, calls: tuple[ToolCall, ...]) -> None:
        for call in calls:
            result, error = await self._call_tool(call)
            content = result if error is None else f"Error: {error}"
            self.conversation.append(Message("tool", content, tool_call_id=call.id, name=call.name))

    async def _call_tool(self, call: ToolCall) -> tuple[str, str | None]:
        try:
            arguments: Mapping[str, Any] = parse_arguments(call.arguments)
            shown: Mapping[str, Any] = arguments
        except ToolError as exc:
            arguments, shown = {}, {"_raw": call.arguments}
            parse_error: str | None = str(exc)
        else:
            parse_error = None
        await self._emit(ToolCallStart, tool_name=call.name, call_id=call.id, arguments=shown)

        async def stream(chunk: str) -> None:
            await self._emit(ToolCallStream, tool_name=call.name, call_id=call.id, chunk=chunk)

        context = ToolContext(self.request.session_id, self.workspace, self.todos, stream)
        started = self.engine._clock()
        result, error = "", parse_error
        with self.telemetry.tool(call, shown) as scope:
            if error is None:
                try:
                    result = await self.engine._tools.run(call.name, arguments, context)
                except ToolError as exc:
                    error = str(exc)
                except Exception as exc:  # a tool's bug must not end the task: the model hears of it and goes on
                    error = f"the tool failed unexpectedly: {type(exc).__name__}: {exc}"
            limit = self.config.tool_result_limit
            result, error = _cap(result, limit), (None if error is None else _cap(error, limit))
            scope.finish(result, error)
        duration = int((self.engine._clock() - started) * 1000)
        await self._emit(
            ToolCallComplete, tool_name=call.name, call_id=call.id, result=result, error=error, duration=duration
        )
        return result, error
