"""A small SSE client on raw asyncio sockets for the task benchmarks: each frame (its ``event`` and ``data``) goes to
a callback with the time it arrived. Cheaper than an HTTP client's line iterator, so the client's own cost stays
out of the figures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

OnFrame = Callable[[bytes, bytes, float], None]
"""``on_frame(event, data, arrived)``; ``arrived`` is ``time.monotonic()``."""


class FrameProtocol(asyncio.Protocol):
    def __init__(self, request: bytes, on_frame: OnFrame, opened: asyncio.Future[None]) -> None:
        self._request = request
        self._on_frame = on_frame
        self._opened = opened
        self._head = b""
        self._in_body = False
        self._raw = b""
        self._buffer = b""
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = opened.get_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self._in_body:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                return
            self._in_body = True
            status = head[:head.find(b"\r\n")]
            if b" 200 " not in status:
                if not self._opened.done():
                    self._opened.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            data = head[end + 4:]
        raw = self._raw + data
        chunks: list[bytes] = []
        position = 0
        while True:
            line_end = raw.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(raw[position:line_end].split(b";")[0], 16)
            start = line_end + 2
            if size == 0 or start + size + 2 > len(raw):
                break
            chunks.append(raw[start:start + size])
            position = start + size + 2
        self._raw = raw[position:]
        buffer = self._buffer + b"".join(chunks)
        frames = buffer.split(b"\n\n")
        self._buffer = frames.pop()
        for frame in frames:
            event, data_line = b"message", b""
            for line in frame.split(b"\n"):
                if line.startswith(b"event: "):
                    event = line[7:]
                elif line.startswith(b"data: "):
                    data_line = line[6:]
            if event == b"connected" and not self._opened.done():
                self._opened.set_result(None)
            elif data_line:
                self._on_frame(event, data_line, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._opened.done():
            self._opened.set_exception(ConnectionError("closed before the connected frame"))
        if not self.closed.done():
            self.closed.set_result(None)


async def open_stream(url: str, session_id: str, token: str | None, on_frame: OnFrame,
                      path: str = "/api/sse") -> FrameProtocol:
    """A stream of ``session_id``, open once its ``connected`` frame arrived."""
    parts = urlsplit(url)
    lines = [f"GET {path}?session_id={session_id} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[None] = loop.create_future()
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    _, protocol = await loop.create_connection(lambda: FrameProtocol(request, on_frame, opened),
                                               parts.hostname or "127.0.0.1", parts.port or 80)
    await opened
    return protocol
