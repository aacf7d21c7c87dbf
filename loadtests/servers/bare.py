"""The reference: a bare asyncio protocol on uvloop that writes each event's frame, encoded once, straight to the
sockets of its session's streams. No framework, no HTTP parser, no per-stream task, no buffer, no auth, no metrics:
about the least work Python can do per delivery, so the figure the others are held against.

Run: ``python -m loadtests.servers.bare`` (see :mod:`loadtests.servers.control` for its stdin commands).
"""

from __future__ import annotations

import asyncio
import json
from typing import cast
from urllib.parse import parse_qs, urlsplit

import uvloop

from loadtests.servers.control import announce, envelope, obey

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"connection: close\r\n\r\n")


class Hub:
    def __init__(self) -> None:
        self.sessions: dict[str, list[asyncio.Transport]] = {}
        self.next_id = 1

    def publish(self, session_id: str, chunk: str) -> None:
        event_id = self.next_id
        self.next_id += 1
        data = json.dumps(envelope(event_id, session_id, chunk), separators=(",", ":"))
        frame = f"id: {event_id}\nevent: tool_call_stream\ndata: {data}\n\n".encode()
        for transport in self.sessions.get(session_id, ()):
            transport.write(frame)


class StreamProtocol(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.request = b""
        self.session_id: str | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.session_id is not None or self.transport is None:
            return
        self.request += data
        if b"\r\n\r\n" not in self.request:
            return
        target = self.request.split(b" ", 2)[1].decode()
        session_id = parse_qs(urlsplit(target).query).get("session_id", [""])[0]
        self.session_id = session_id
        connected = json.dumps({"session_id": session_id}, separators=(",", ":"))
        self.transport.write(HEAD + f"event: connected\ndata: {connected}\n\n".encode())
        self.hub.sessions.setdefault(session_id, []).append(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session_id is not None and self.transport is not None:
            self.hub.sessions[self.session_id].remove(self.transport)


async def main() -> None:
    hub = Hub()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: StreamProtocol(hub), "127.0.0.1", 0, backlog=4096)
    stopped = asyncio.Event()

    async def emit(session_id: str, seq: int, chunk: str) -> None:
        hub.publish(session_id, chunk)
        await asyncio.sleep(0)

    control = asyncio.create_task(obey(emit, stopped.set))
    announce({"state": "listening", "port": server.sockets[0].getsockname()[1]})
    await stopped.wait()
    server.close()
    await control


if __name__ == "__main__":
    uvloop.run(main())
