"""The engine's window for observers: one scope per task, per ReAct iteration, per model call and per tool call.

The engine opens each scope around the step it times and tells it how the step ended; what is made of that (spans,
metrics) is the observer's business (``service.observability.agent`` makes OpenTelemetry spans and Prometheus
metrics). A scope's ``with`` block ends with the step: an exception leaving it (``asyncio.CancelledError``, an
:class:`~service.domain.llm.LLMError`) is how the scope learns that the step was cancelled or failed.

:data:`NO_TELEMETRY` observes nothing and costs next to nothing: the engine's default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from service.domain.llm import ChatResponse, Message, ToolCall


class TaskScope(Protocol):
    def finish(self, outcome: str, iterations: int, error_kind: str | None) -> None:
        """The run ended with ``outcome`` (``completed`` or ``failed``; ``error_kind`` says why it failed)."""


class ChatScope(Protocol):
    def finish(self, response: ChatResponse) -> None:
        """The model answered (an :class:`LLMError` leaving the block means it did not)."""


class ToolScope(Protocol):
    def finish(self, result: str, error: str | None) -> None:
        """The tool returned ``result``, or failed with ``error`` (given back to the model)."""


class Telemetry(Protocol):
    """Opens the scopes; each returns a context manager whose value is the scope to tell how the step ended."""

    def task(self, session_id: str, task_id: str, text: str) -> AbstractContextManager[TaskScope]: ...

    def iteration(self, number: int) -> AbstractContextManager[None]: ...

    def chat(self, messages: Sequence[Message]) -> AbstractContextManager[ChatScope]: ...

    def tool(self, call: ToolCall, arguments: Mapping[str, Any]) -> AbstractContextManager[ToolScope]: ...


class _Ignored:
    """Every scope at once, recording nothing."""

    __slots__ = ()

    def finish(self, *args: Any) -> None:
        return None


class NoTelemetry:
    """Observes nothing."""

    __slots__ = ()

    def task(self, session_id: str, task_id: str, text: str) -> AbstractContextManager[TaskScope]:
        return nullcontext(_IGNORED)

    def iteration(self, number: int) -> AbstractContextManager[None]:
        return nullcontext()

    def chat(self, messages: Sequence[Message]) -> AbstractContextManager[ChatScope]:
        return nullcontext(_IGNORED)

    def tool(self, call: ToolCall, arguments: Mapping[str, Any]) -> AbstractContextManager[ToolScope]:
        return nullcontext(_IGNORED)


_IGNORED = _Ignored()
NO_TELEMETRY: Telemetry = NoTelemetry()
