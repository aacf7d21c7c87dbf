"""The conversation the agent keeps, and the port to the language model that continues it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model asked for; ``arguments`` is the model's raw JSON text, parsed (and checked) by the engine."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    """The tool's name, on ``tool`` messages."""

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            body["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            body["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            body["name"] = self.name
        return body

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> Message:
        calls = tuple(
            ToolCall(id=str(c["id"]), name=str(c["name"]), arguments=str(c.get("arguments", "")))
            for c in body.get("tool_calls") or ()
        )
        return cls(
            role=body["role"],
            content=str(body.get("content") or ""),
            tool_calls=calls,
            tool_call_id=body.get("tool_call_id"),
            name=body.get("name"),
        )


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What the model is told about a tool: its name, what it does, and the JSON schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """One finished model turn: its text, the tool calls it asks for (none means it answered), and its cost."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    model: str = ""
    first_chunk_seconds: float | None = field(default=None, compare=False)
    """From the request to the first streamed chunk, when the adapter streams (a timing: not compared)."""


TextSink = Callable[[str], Awaitable[None]]
"""Receives each piece of the model's text as it streams in."""


class LLMError(Exception):
    """The model could not answer (after the adapter's own retries). ``kind`` is a short, bounded label."""

    def __init__(self, message: str, *, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class ChatModel(Protocol):
    """One streamed chat turn.

    ``chat`` sends the conversation and the tools, awaits ``on_text`` with every text delta in order as it arrives,
    and returns the whole turn once the model has finished. It raises :class:`LLMError` when the model fails after
    the adapter's retries and timeouts; it must never hang past its timeout. Cancelling the awaiting task aborts
    the request.
    """

    @property
    def model(self) -> str: ...

    async def chat(
        self, messages: Sequence[Message], tools: Sequence[ToolSpec], on_text: TextSink
    ) -> ChatResponse: ...
