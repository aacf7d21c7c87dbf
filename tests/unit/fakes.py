"""Fakes of the domain ports for the unit tests, and plain factories for the records they pass around.

- :class:`ScriptedModel` plays a ``ChatModel`` from a list of turns and records what it was sent.
- :class:`EchoTool`, :class:`FailingTool`, :class:`CrashingTool`, :class:`SlowTool`: tools that behave one way each.
- :class:`RecordingSink` keeps every event the engine emits.
- :class:`MemoryTodoList` (shared with the tool tests) is the todo list port in memory.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.domain.events import Event
from service.domain.llm import ChatResponse, Message, TextSink, ToolCall, ToolSpec, Usage
from service.domain.tools import ToolContext, ToolError
from tests.unit.tool_helpers import MemoryTodoList

__all__ = [
    "CrashingTool",
    "EchoTool",
    "FailingTool",
    "Gated",
    "MemoryTodoList",
    "RecordingSink",
    "ScriptedModel",
    "SlowTool",
    "Turn",
    "answer",
    "call",
    "clear_settings_environment",
    "tool_turn",
]


# Factories ---------------------------------------------------------------------------------------------------------


def answer(content: str = "done", prompt_tokens: int = 0, completion_tokens: int = 0) -> ChatResponse:
    """A final model turn: text and no tool call."""
    return ChatResponse(content, usage=Usage(prompt_tokens, completion_tokens), finish_reason="stop")


def call(name: str, arguments: Mapping[str, Any] | str | None = None, call_id: str = "call_1") -> ToolCall:
    """A tool call; ``arguments`` given as a mapping is sent as JSON text, a string is sent as is."""
    raw = arguments if isinstance(arguments, str) else json.dumps(dict(arguments or {}))
    return ToolCall(id=call_id, name=name, arguments=raw)


def tool_turn(*calls: ToolCall, content: str = "", prompt_tokens: int = 0, completion_tokens: int = 0) -> ChatResponse:
    """A model turn that asks for ``calls``."""
    return ChatResponse(content, tuple(calls), Usage(prompt_tokens, completion_tokens), finish_reason="tool_calls")


def clear_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every variable ``Settings`` reads, so a test sees only what it sets (the CI env may hold some)."""
    for name in list(os.environ):
        if name.upper().startswith(("ALEX_", "OTEL_")) or name.upper() in {"OPENAI_API_KEY", "PORT"}:
            monkeypatch.delenv(name, raising=False)


# The model ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Gated:
    """A turn that waits for ``event`` before it plays ``then`` (a response, or an exception to raise)."""

    event: asyncio.Event
    then: ChatResponse | BaseException = field(default_factory=lambda: answer("released"))


Turn = ChatResponse | BaseException | asyncio.Event | Gated
"""A scripted turn: a response, an exception to raise, or a wait (a bare event answers ``released`` after it)."""


class ScriptedModel:
    """A ``ChatModel`` that plays ``turns`` in order, one a ``chat`` call.

    Each turn is taken when its call starts, so concurrent calls (several tasks) take turns in call order. Text
    streams to ``on_text`` in a few deltas before the turn returns. ``requests`` holds a copy of the messages of
    every call; ``parked`` counts calls that have waited on a gate, ``cancelled`` those cancelled meanwhile.
    Running out of turns is a test bug and raises ``AssertionError``.
    """

    def __init__(self, turns: Iterable[Turn] = (), *, deltas: int = 3, model: str = "scripted") -> None:
        self._turns = list(turns)
        self._deltas = deltas
        self._model = model
        self._parked = asyncio.Condition()
        self.requests: list[list[Message]] = []
        self.tools: list[list[ToolSpec]] = []
        self.parked = 0
        self.cancelled = 0

    @property
    def model(self) -> str:
        return self._model

    @property
    def remaining(self) -> int:
        return len(self._turns)

    async def until_parked(self, count: int = 1) -> None:
        """Return once ``count`` calls in all have reached a gate."""
        async with self._parked:
            await self._parked.wait_for(lambda: self.parked >= count)

    async def chat(self, messages: Sequence[Message], tools: Sequence[ToolSpec], on_text: TextSink) -> ChatResponse:
        self.requests.append(list(messages))
        self.tools.append(list(tools))
        if not self._turns:
            raise AssertionError(f"ScriptedModel: no turn left for call {len(self.requests)}")
        turn = self._turns.pop(0)
        if isinstance(turn, asyncio.Event):
            turn = Gated(turn)
        if isinstance(turn, Gated):
            async with self._parked:
                self.parked += 1
                self._parked.notify_all()
            try:
                await turn.event.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            turn = turn.then
        if isinstance(turn, BaseException):
            raise turn
        for piece in split(turn.content, self._deltas):
            await on_text(piece)
        return turn


def split(text: str, parts: int) -> list[str]:
    """``text`` in up to ``parts`` non-empty pieces, in order."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i:i + size] for i in range(0, len(text), size)]


# Tools -------------------------------------------------------------------------------------------------------------

_TEXT_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}

_NO_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class EchoTool:
    """Returns its ``text`` argument; with ``stream`` it also streams it, in two chunks. Records every call."""

    description = "Returns the text it is given."
    parameters = _TEXT_PARAMETERS

    def __init__(self, name: str = "echo", *, stream: bool = False) -> None:
        self.name = name
        self._stream = stream
        self.calls: list[Mapping[str, Any]] = []
        self.contexts: list[ToolContext] = []

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        self.calls.append(dict(arguments))
        self.contexts.append(context)
        text = str(arguments["text"])
        if self._stream:
            half = len(text) // 2
            await context.stream(text[:half])
            await context.stream(text[half:])
        return text


class FailingTool:
    """Raises :class:`ToolError` with ``message``: a failure the model should read."""

    description = "Always fails."
    parameters = _NO_PARAMETERS

    def __init__(self, name: str = "fail", message: str = "the file does not exist") -> None:
        self.name = name
        self.message = message

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        raise ToolError(self.message)


class CrashingTool:
    """Raises ``RuntimeError``: a bug in a tool."""

    description = "Always crashes."
    parameters = _NO_PARAMETERS

    def __init__(self, name: str = "crash", message: str = "boom") -> None:
        self.name = name
        self.message = message

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        raise RuntimeError(self.message)


class SlowTool:
    """Waits for ``release`` (or sleeps ``seconds`` when given) before answering; records whether it was cancelled.

    ``started`` is set once it runs, so a test can cancel it mid-work without sleeping.
    """

    description = "Takes its time."
    parameters = _NO_PARAMETERS

    def __init__(self, name: str = "slow", *, seconds: float | None = None, result: str = "slow result") -> None:
        self.name = name
        self.seconds = seconds
        self.result = result
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        self.started.set()
        try:
            if self.seconds is None:
                await self.release.wait()
            else:
                await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return self.result


# The sink ----------------------------------------------------------------------------------------------------------


class RecordingSink:
    """An ``EventSink`` that keeps every event in order.

    ``hold`` names an event type at which ``emit`` waits (after recording the event) until ``release`` is set: a
    sink that takes its time, as a remote log may, and a place to cancel a run at; ``held`` is set when it waits.
    """

    def __init__(self, hold: str | None = None) -> None:
        self.events: list[Event] = []
        self.hold = hold
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def emit(self, event: Event) -> None:
        self.events.append(event)
        if self.hold is not None and event.event_type == self.hold:
            self.held.set()
            await self.release.wait()

    @property
    def types(self) -> list[str]:
        return [event.event_type for event in self.events]

    def of(self, event_type: type[Event]) -> list[Any]:
        """The events of one type (typed ``Any`` so tests read their fields without casts)."""
        return [event for event in self.events if isinstance(event, event_type)]
