"""The :class:`~service.domain.llm.ChatModel` port over the Chat Completions API of OpenAI-compatible servers.

One ``chat`` call is one streamed request. Failures come out as :class:`~service.domain.llm.LLMError` with one
of these kinds (bounded, so they can label metrics):

``timeout``      no answer, or no progress in the stream, within the timeout
``connection``   the server could not be reached
``rate_limit``   429, after the SDK's retries
``auth``         401 or 403
``bad_request``  400, 404 or 422: the request itself is wrong (unknown model, bad messages)
``server``       5xx after the SDK's retries, or an error the server sent inside the stream
``stream``       the stream was malformed or broke off before the model finished
``error``        anything else

Messages never carry the API key: servers sometimes echo it (masked or not) in their error bodies.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat.chat_completion_chunk import (
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.completion_usage import CompletionUsage

from service.config import Settings
from service.domain.llm import ChatResponse, LLMError, Message, TextSink, ToolCall, ToolSpec, Usage

OPENAI_BASE_URL = "https://api.openai.com/v1"
KEYLESS_API_KEY = "not-needed"
"""Sent when no key is configured: keyless OpenAI-compatible servers (vLLM, Ollama) take any bearer token."""

# Server messages are shown to operators and clients; a few hundred characters say what went wrong.
_MAX_SERVER_MESSAGE = 300
_SECRET_PATTERNS = (
    re.compile(r"sk-[A-Za-z0-9_\-*.]{3,}"),
    re.compile(r"(?i)(bearer\s+)\S+"),
)


class OpenAIChatModel:
    """A :class:`~service.domain.llm.ChatModel` backed by ``openai.AsyncOpenAI``.

    ``timeout_seconds`` bounds connecting, every read, and the wait for each chunk of the stream, so a server
    that stalls (or trickles keep-alive bytes without content) fails the turn with kind ``timeout`` instead of
    hanging. The SDK retries connection failures, 408/409/429 and 5xx answers ``max_retries`` times, before
    any text was streamed; a stream that fails midway is not retried (its text already went to ``on_text``).
    Call :meth:`aclose` once, when the model is no longer needed.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        model: str,
        base_url: str | None = None,
        timeout_seconds: float = 120.0,
        max_retries: int = 2,
    ) -> None:
        self._model = model
        self._timeout = timeout_seconds
        self._api_key = api_key or KEYLESS_API_KEY
        self._client = openai.AsyncOpenAI(
            api_key=self._api_key,
            # Given always: left out, the SDK would read OPENAI_BASE_URL itself, behind the Settings' back.
            base_url=base_url or OPENAI_BASE_URL,
            timeout=timeout_seconds,
            max_retries=max_retries,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIChatModel:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key is not None else None
        return cls(
            api_key=key,
            model=settings.llm_model,
            base_url=settings.base_url,
            timeout_seconds=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
        )

    @property
    def model(self) -> str:
        return self._model

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._client.close()

    async def chat(self, messages: Sequence[Message], tools: Sequence[ToolSpec], on_text: TextSink) -> ChatResponse:
        wire_messages = to_wire_messages(messages)
        started = time.monotonic()
        try:
            stream = await self._client.chat.completions.create(
                model=self._model,
                messages=wire_messages,
                # Some servers refuse an empty tool list, so no tools means no tool fields at all.
                tools=to_wire_tools(tools) if tools else openai.omit,
                tool_choice="auto" if tools else openai.omit,
                stream=True,
                stream_options={"include_usage": True},
            )
        except openai.OpenAIError as exc:
            raise self._error(exc, streaming=False) from None

        turn = _Turn(default_model=self._model)
        # ``async with`` closes the HTTP response on every way out, cancellation included, so an abandoned
        # stream never keeps the connection (and the server's generation) running.
        async with stream:
            while True:
                try:
                    # The SDK's read timeout restarts with every byte; this one only with every chunk.
                    async with asyncio.timeout(self._timeout):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    message = f"the model's stream stalled: nothing came for {self._timeout:g}s"
                    raise LLMError(message, kind="timeout") from None
                except json.JSONDecodeError as exc:
                    raise LLMError(f"the model's stream held invalid JSON: {exc.msg}", kind="stream") from None
                except openai.OpenAIError as exc:
                    raise self._error(exc, streaming=True) from None
                if turn.first_chunk_seconds is None:
                    turn.first_chunk_seconds = time.monotonic() - started
                text = turn.add(chunk)
                if text:
                    await on_text(text)
        return turn.finish()

    def _error(self, exc: openai.OpenAIError, *, streaming: bool) -> LLMError:
        """Translate an SDK failure into a bounded kind and a message free of the key."""
        kind, message = _classify(exc, streaming=streaming, timeout=self._timeout)
        return LLMError(redact(message, self._api_key), kind=kind)


def _classify(exc: openai.OpenAIError, *, streaming: bool, timeout: float) -> tuple[str, str]:
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", f"the model server did not answer within {timeout:g}s"
    if isinstance(exc, openai.APIConnectionError):
        cause = _describe_cause(exc)
        if streaming:
            return "stream", f"the model's stream broke off before the answer was complete{cause}"
        return "connection", f"could not reach the model server{cause}"
    if isinstance(exc, openai.APIResponseValidationError):
        return "stream", "the model server sent an answer of an unexpected shape"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = _server_message(exc.body)
        text = f"the model server answered {status}" + (f": {detail}" if detail else "")
        if status == 429:
            return "rate_limit", text
        if status in (401, 403):
            return "auth", text
        if status in (400, 404, 422):
            return "bad_request", text
        if status >= 500:
            return "server", text
        return "error", text
    if isinstance(exc, openai.APIError):
        # An error event inside a 200 stream: the server gave up while generating.
        detail = _server_message(exc.body) or exc.message
        return "server", f"the model server reported an error while streaming: {detail}"
    return "error", f"the model call failed: {type(exc).__name__}"


def _describe_cause(exc: BaseException) -> str:
    cause = exc.__cause__
    if cause is None:
        return ""
    detail = str(cause).strip()
    return f" ({type(cause).__name__}: {detail})" if detail else f" ({type(cause).__name__})"


def _server_message(body: object) -> str:
    """The human part of an OpenAI-style error body (``{"message": ...}``), shortened."""
    if isinstance(body, dict):
        message = body.get("message")
        text = message if isinstance(message, str) else ""
    elif isinstance(body, str):
        text = body
    else:
        text = ""
    text = " ".join(text.split())
    if len(text) > _MAX_SERVER_MESSAGE:
        text = text[: _MAX_SERVER_MESSAGE - 1] + "…"
    return text


def redact(text: str, secret: str) -> str:
    """``text`` without ``secret`` and without anything shaped like an OpenAI key or a bearer token."""
    # A very short "key" (a test value) would blank out ordinary words; real keys are long.
    if len(secret) >= 8 and secret != KEYLESS_API_KEY:
        text = text.replace(secret, "***")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: (match.group(1) if match.groups() else "sk-") + "***", text)
    return text


def to_wire_messages(messages: Sequence[Message]) -> list[ChatCompletionMessageParam]:
    """The conversation in the Chat Completions wire format.

    Raises :class:`LLMError` (``bad_request``) for a tool message without the id of the call it answers: every
    server rejects it, and saying so here names the cause.
    """
    wire: list[ChatCompletionMessageParam] = []
    for message in messages:
        if message.role == "system":
            wire.append(ChatCompletionSystemMessageParam(role="system", content=message.content))
        elif message.role == "user":
            wire.append(ChatCompletionUserMessageParam(role="user", content=message.content))
        elif message.role == "assistant":
            if message.tool_calls:
                wire.append(
                    ChatCompletionAssistantMessageParam(
                        role="assistant",
                        # Servers expect null, not "", beside tool calls.
                        content=message.content or None,
                        tool_calls=[
                            ChatCompletionMessageFunctionToolCallParam(
                                id=call.id,
                                type="function",
                                function={"name": call.name, "arguments": call.arguments},
                            )
                            for call in message.tool_calls
                        ],
                    )
                )
            else:
                wire.append(ChatCompletionAssistantMessageParam(role="assistant", content=message.content))
        else:
            if message.tool_call_id is None:
                raise LLMError("a tool result in the conversation does not name its call", kind="bad_request")
            wire.append(
                ChatCompletionToolMessageParam(role="tool", tool_call_id=message.tool_call_id, content=message.content)
            )
    return wire


def to_wire_tools(tools: Sequence[ToolSpec]) -> list[ChatCompletionFunctionToolParam]:
    return [
        ChatCompletionFunctionToolParam(
            type="function",
            function={
                "name": tool.name,
                "description": tool.description,
                "parameters": dict(tool.parameters),
            },
        )
        for tool in tools
    ]


@dataclass(slots=True)
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Turn:
    """Assembles one streamed turn from its chunks.

    The SDK builds chunks without validating them, so every field is checked here: servers that only claim
    compatibility leave fields out or send them with the wrong type.
    """

    default_model: str
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PendingCall] = field(default_factory=dict)
    usage: Usage | None = None
    finish_reason: str | None = None
    model: str = ""
    first_chunk_seconds: float | None = None

    def add(self, chunk: Any) -> str:
        """Take one chunk in; return its text delta ("" when it has none)."""
        if not isinstance(chunk, ChatCompletionChunk):
            raise LLMError("the model's stream held something other than a chat completion chunk", kind="stream")
        if isinstance(chunk.model, str) and chunk.model and not self.model:
            self.model = chunk.model
        if isinstance(chunk.usage, CompletionUsage):
            self.usage = Usage(
                prompt_tokens=_count(chunk.usage.prompt_tokens),
                completion_tokens=_count(chunk.usage.completion_tokens),
            )
        choices: Any = chunk.choices
        if choices is None:
            return ""
        if not isinstance(choices, list):
            raise LLMError("the model's stream held a chunk whose choices are not a list", kind="stream")
        delta_text: list[str] = []
        for choice in choices:
            if not isinstance(choice, Choice):
                raise LLMError("the model's stream held a malformed choice", kind="stream")
            # Only the first choice counts: the request never asks for more than one.
            if choice.index not in (0, None):
                continue
            if isinstance(choice.finish_reason, str):
                self.finish_reason = choice.finish_reason
            delta: Any = choice.delta
            if delta is None:
                continue
            if not isinstance(delta, ChoiceDelta):
                raise LLMError("the model's stream held a malformed delta", kind="stream")
            for piece in (delta.content, delta.refusal):
                if isinstance(piece, str) and piece:
                    delta_text.append(piece)
            if delta.tool_calls is not None:
                self._add_calls(delta.tool_calls)
        text = "".join(delta_text)
        if text:
            self.text.append(text)
        return text

    def _add_calls(self, deltas: Any) -> None:
        if not isinstance(deltas, list):
            raise LLMError("the model's stream held tool calls that are not a list", kind="stream")
        for position, delta in enumerate(deltas):
            if not isinstance(delta, ChoiceDeltaToolCall):
                raise LLMError("the model's stream held a malformed tool call", kind="stream")
            # Some servers leave out ``index`` when they send each call whole, in one delta.
            index = delta.index if isinstance(delta.index, int) else len(self.calls) + position
            pending = self.calls.setdefault(index, _PendingCall())
            # The id and name come on the first delta of a call; some servers repeat them, so the first wins.
            if isinstance(delta.id, str) and delta.id and not pending.id:
                pending.id = delta.id
            function: Any = delta.function
            if function is None:
                continue
            if not isinstance(function, ChoiceDeltaToolCallFunction):
                raise LLMError("the model's stream held a malformed tool call", kind="stream")
            if isinstance(function.name, str) and function.name and not pending.name:
                pending.name = function.name
            if isinstance(function.arguments, str):
                pending.arguments.append(function.arguments)

    def finish(self) -> ChatResponse:
        """The whole turn; raises :class:`LLMError` (``stream``) if the stream ended early."""
        if self.finish_reason is None:
            raise LLMError("the model's stream ended before the model finished its answer", kind="stream")
        calls: list[ToolCall] = []
        for index in sorted(self.calls):
            pending = self.calls[index]
            if not pending.name:
                raise LLMError("the model asked for a tool call without a name", kind="stream")
            calls.append(
                ToolCall(id=pending.id or f"call_{index}", name=pending.name, arguments="".join(pending.arguments))
            )
        return ChatResponse(
            content="".join(self.text),
            tool_calls=tuple(calls),
            usage=self.usage or Usage(),
            finish_reason=self.finish_reason,
            model=self.model or self.default_model,
            first_chunk_seconds=self.first_chunk_seconds,
        )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
