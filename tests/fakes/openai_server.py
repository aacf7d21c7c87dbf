"""A fake OpenAI-compatible server on a real socket, scripted by the test that runs it.

It speaks HTTP/1.1 by hand on ``127.0.0.1`` (a free port), in a thread with its own event loop, so sync tests,
async tests and a separate server process (through ``ALEX_BASE_URL``) can all use it::

    with FakeOpenAI() as fake:
        fake.enqueue_text("hello")
        fake.enqueue_tool_calls([{"name": "bash", "arguments": {"command": "ls"}}])
        fake.enqueue_error(500)
        ...  # point a client at fake.base_url
        assert fake.requests[0].body["stream"] is True

``POST /v1/chat/completions`` answers each request with the next queued reply, or with the text "ok" when none is
queued. A streamed answer is ``text/event-stream``, chunked, one ``data: {chat.completion.chunk}`` event a
piece, tool-call arguments split over several deltas, a last ``choices: []`` chunk with the usage when
``stream_options.include_usage`` is set, then ``data: [DONE]``. A request without ``"stream": true`` gets a plain
``chat.completion``. Every response closes its connection, so each request is one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    411: "Length Required",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 429: "rate_limit_error"}
_MAX_HEADER_BYTES = 64 * 1024
_CREATED = 1_700_000_000
_WORD = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True, slots=True)
class FakeToolCall:
    name: str
    arguments: str
    id: str


@dataclass(frozen=True, slots=True)
class TextReply:
    """A streamed turn: text (sent a few words a chunk), then tool calls (arguments in pieces), then usage."""

    text: str = ""
    tool_calls: tuple[FakeToolCall, ...] = ()
    usage: tuple[int, int] | None = None
    """(prompt, completion) tokens; estimated from the request and the reply when not given."""
    finish_reason: str | None = None
    model: str | None = None
    """The model the chunks name; the requested one when not given."""
    interleave: bool = False
    """Send the argument pieces of parallel tool calls alternately instead of one call after the other."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    message: str | None = None
    """The error's message; by default a generic one, or for 401 one that echoes the bearer token in full."""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StallReply:
    """Start a stream, send ``text``, then send no more data and keep the connection open until the client leaves.

    With ``keepalive_seconds`` it sends an SSE comment (``: ping``) that often meanwhile: bytes, but no progress.
    """

    text: str = ""
    keepalive_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class CutReply:
    """Start a stream, send ``text``, then close the connection without ending the chunked body."""

    text: str = ""


@dataclass(frozen=True, slots=True)
class RawReply:
    """A 200 ``text/event-stream`` whose body is exactly ``body``, properly ended (for malformed streams)."""

    body: str


Reply = TextReply | ErrorReply | StallReply | CutReply | RawReply


@dataclass(slots=True)
class RecordedRequest:
    """One request as the server received it. ``body`` is the parsed JSON (None when it was not JSON)."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: Any
    client_gone: threading.Event = field(default_factory=threading.Event)
    """Set when the client closed the connection while the server still held the response open (a stall)."""

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


def tool_call(name: str, arguments: Mapping[str, Any] | str, *, call_id: str | None = None) -> FakeToolCall:
    """A tool call for :meth:`FakeOpenAI.enqueue_tool_calls`; ``arguments`` as an object or as raw text."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return FakeToolCall(name=name, arguments=raw, id=call_id or "")


class FakeOpenAI:
    """The fake server; see the module docstring. Thread-safe: enqueue and inspect from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    # Lifecycle

    def start(self) -> FakeOpenAI:
        if self._thread is not None:
            raise RuntimeError("the fake server is already running")
        self._thread = threading.Thread(target=self._run, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the fake server did not start within 10s")
        if self._failure is not None:
            raise RuntimeError("the fake server failed to start") from self._failure
        return self

    def close(self) -> None:
        """Stop serving, drop open connections, and join the thread. Safe to call twice."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have stopped on its own
                loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """What a client sets as its OpenAI base URL: ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # Script

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def enqueue_text(self, text: str, *, usage: tuple[int, int] | None = None, model: str | None = None) -> None:
        self.enqueue(TextReply(text=text, usage=usage, model=model))

    def enqueue_tool_calls(
        self,
        calls: Sequence[FakeToolCall | Mapping[str, Any]],
        *,
        text: str = "",
        usage: tuple[int, int] | None = None,
        interleave: bool = False,
    ) -> None:
        """Queue a turn asking for ``calls``: :func:`tool_call` values or ``{"name", "arguments", "id"?}`` dicts."""
        built = tuple(
            call
            if isinstance(call, FakeToolCall)
            else tool_call(call["name"], call["arguments"], call_id=call.get("id"))
            for call in calls
        )
        self.enqueue(TextReply(text=text, tool_calls=built, usage=usage, interleave=interleave))

    def enqueue_error(self, status: int, message: str | None = None, *, retry_after_ms: int | None = None) -> None:
        """Queue an error answer with an OpenAI-style body; ``retry_after_ms`` sets the header the SDK obeys."""
        headers = {"retry-after-ms": str(retry_after_ms)} if retry_after_ms is not None else {}
        self.enqueue(ErrorReply(status=status, message=message, headers=headers))

    def enqueue_stall(self, text: str = "", *, keepalive_seconds: float | None = None) -> None:
        self.enqueue(StallReply(text=text, keepalive_seconds=keepalive_seconds))

    def enqueue_cut(self, text: str = "") -> None:
        self.enqueue(CutReply(text=text))

    def enqueue_raw(self, body: str) -> None:
        self.enqueue(RawReply(body=body))

    @property
    def pending(self) -> int:
        """Replies queued and not yet sent."""
        with self._lock:
            return len(self._replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._replies.popleft() if self._replies else TextReply(text="ok")

    # The server, on its own thread and loop

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() rather than lost in the thread
            self._failure = exc
        finally:
            self._started.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            request = await _read_request(reader)
            if request is None:
                return
            with self._lock:
                self._requests.append(request)
            await self._answer(request, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client left; nothing to answer
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(
        self, request: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            await _send_json(writer, 200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            return
        if request.method != "POST" or not request.path.rstrip("/").endswith("/chat/completions"):
            await _send_error(writer, ErrorReply(404, f"no route for {request.method} {request.path}"), request)
            return
        if not isinstance(request.body, dict):
            await _send_error(writer, ErrorReply(400, "the body is not a JSON object"), request)
            return
        reply = self._next_reply()
        if isinstance(reply, ErrorReply):
            await _send_error(writer, reply, request)
            return
        completion_id = f"chatcmpl-fake-{next(self._ids)}"
        if not request.body.get("stream"):
            await _send_json(writer, 200, _completion(reply, request, completion_id))
            return
        await _start_stream(writer)
        if isinstance(reply, RawReply):
            await _send_chunk(writer, reply.body)
            await _end_stream(writer)
            return
        if isinstance(reply, TextReply):
            for event in _stream_events(reply, request, completion_id):
                await _send_chunk(writer, event)
            await _end_stream(writer)
            return
        # A stall or a cut sends the text's chunks only, never the finish.
        for event in _text_events(reply.text, completion_id, _model(request, None), _wants_usage(request)):
            await _send_chunk(writer, event)
        if isinstance(reply, CutReply):
            writer.close()
            return
        await _hold(reply, request, reader, writer)


async def _hold(
    reply: StallReply, request: RecordedRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Keep a stalled stream open until the client closes it; then mark the request's ``client_gone``."""
    try:
        while True:
            if reply.keepalive_seconds is None:
                data = await reader.read(1024)
            else:
                try:
                    data = await asyncio.wait_for(reader.read(1024), reply.keepalive_seconds)
                except TimeoutError:
                    await _send_chunk(writer, ": ping\n\n")
                    continue
            if not data:
                break
    except ConnectionError:
        pass
    request.client_gone.set()


async def _read_request(reader: asyncio.StreamReader) -> RecordedRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        return None
    if len(head) > _MAX_HEADER_BYTES:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    raw = await reader.readexactly(length) if length else b""
    try:
        body: Any = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        body = None
    return RecordedRequest(method=method, path=path, headers=headers, body=body)


def _model(request: RecordedRequest, override: str | None) -> str:
    if override:
        return override
    requested = request.body.get("model") if isinstance(request.body, dict) else None
    return requested if isinstance(requested, str) else "fake-model"


def _wants_usage(request: RecordedRequest) -> bool:
    options = request.body.get("stream_options") if isinstance(request.body, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(reply: TextReply, request: RecordedRequest) -> dict[str, int]:
    if reply.usage is not None:
        prompt, completion = reply.usage
    else:
        prompt = len(json.dumps(request.body.get("messages", []))) // 4 + 1
        completion = (len(reply.text) + sum(len(call.arguments) for call in reply.tool_calls)) // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _call_id(reply: TextReply, index: int) -> str:
    return reply.tool_calls[index].id or f"call_fake_{index}"


def _chunk(completion_id: str, model: str, delta: dict[str, Any], finish: str | None, usage: bool) -> str:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = None  # as OpenAI does: null on every chunk but the last
    return f"data: {json.dumps(body)}\n\n"


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _text_events(text: str, completion_id: str, model: str, usage: bool) -> list[str]:
    """The opening chunk (role, empty content), then the text two words a chunk, whitespace kept."""
    events = [_chunk(completion_id, model, {"role": "assistant", "content": ""}, None, usage)]
    words = _WORD.findall(text)
    pieces = ["".join(words[i : i + 2]) for i in range(0, len(words), 2)]
    events.extend(_chunk(completion_id, model, {"content": piece}, None, usage) for piece in pieces)
    return events


def _stream_events(reply: TextReply, request: RecordedRequest, completion_id: str) -> list[str]:
    model = _model(request, reply.model)
    usage = _wants_usage(request)
    events = _text_events(reply.text, completion_id, model, usage)
    # Each call opens with its index, id, type and name; its arguments follow in pieces of a few characters.
    openings = [
        {
            "index": index,
            "id": _call_id(reply, index),
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        for index, call in enumerate(reply.tool_calls)
    ]
    pieces = [
        [{"index": index, "function": {"arguments": piece}} for piece in _pieces(call.arguments, 7)]
        for index, call in enumerate(reply.tool_calls)
    ]
    deltas: list[dict[str, Any]] = []
    if reply.interleave:
        deltas.extend(openings)
        for row in itertools.zip_longest(*pieces):
            deltas.extend(delta for delta in row if delta is not None)
    else:
        for opening, call_pieces in zip(openings, pieces, strict=True):
            deltas.append(opening)
            deltas.extend(call_pieces)
    events.extend(_chunk(completion_id, model, {"tool_calls": [delta]}, None, usage) for delta in deltas)
    finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
    events.append(_chunk(completion_id, model, {}, finish, usage))
    if usage:
        final = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": _CREATED,
            "model": model,
            "system_fingerprint": None,
            "choices": [],
            "usage": _usage(reply, request),
        }
        events.append(f"data: {json.dumps(final)}\n\n")
    events.append("data: [DONE]\n\n")
    return events


def _completion(reply: Reply, request: RecordedRequest, completion_id: str) -> dict[str, Any]:
    text_reply = reply if isinstance(reply, TextReply) else TextReply(text="ok")
    message: dict[str, Any] = {"role": "assistant", "content": text_reply.text or None, "refusal": None}
    if text_reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": _call_id(text_reply, index),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for index, call in enumerate(text_reply.tool_calls)
        ]
    finish = text_reply.finish_reason or ("tool_calls" if text_reply.tool_calls else "stop")
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": _CREATED,
        "model": _model(request, text_reply.model),
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(text_reply, request),
    }


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_json(
    writer: asyncio.StreamWriter, status: int, body: object, headers: Mapping[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    head = {
        "content-type": "application/json",
        "content-length": str(len(data)),
        "connection": "close",
        "x-request-id": "req_fake",
        **(headers or {}),
    }
    writer.write(_head(status, head) + data)
    await writer.drain()


async def _send_error(writer: asyncio.StreamWriter, reply: ErrorReply, request: RecordedRequest) -> None:
    message = reply.message
    if message is None:
        if reply.status == 401:
            # Real servers echo the key (masked); echoing it whole makes the redaction test strict.
            token = (request.authorization or "").removeprefix("Bearer ")
            message = f"Incorrect API key provided: {token}."
        else:
            message = f"The fake server answered {reply.status}."
    body = {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(reply.status, "server_error" if reply.status >= 500 else "invalid_request_error"),
            "param": None,
            "code": None,
        }
    }
    await _send_json(writer, reply.status, body, reply.headers)


async def _start_stream(writer: asyncio.StreamWriter) -> None:
    head = {
        "content-type": "text/event-stream; charset=utf-8",
        "transfer-encoding": "chunked",
        "cache-control": "no-cache",
        "connection": "close",
        "x-request-id": "req_fake",
    }
    writer.write(_head(200, head))
    await writer.drain()


async def _send_chunk(writer: asyncio.StreamWriter, text: str) -> None:
    data = text.encode()
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _end_stream(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")
    await writer.drain()
