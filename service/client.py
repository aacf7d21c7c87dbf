"""A small client of the service's own API: Server-Sent Events parsing and a task follower (``alex-server run``)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


async def parse_sse(lines: AsyncIterator[str], on_comment: Callable[[str], None] | None = None,
                    ) -> AsyncGenerator[SseMessage, None]:
    """Messages from a ``text/event-stream`` body, per the WHATWG rules.

    Each message's ``id`` is its own ``id`` line (None without one: ``connected`` has none); a client resuming with
    ``Last-Event-ID`` keeps the last one it saw. Comment lines (the ``: ping`` heartbeats) go to ``on_comment``.
    """
    event, message_id = "", None
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield SseMessage(event or "message", "\n".join(data), message_id)
            event, data, message_id = "", [], None
            continue
        if line.startswith(":"):
            if on_comment is not None:
                on_comment(line)
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            message_id = value


async def follow(client: httpx.AsyncClient, session_id: str, last_event_id: str | None = None,
                 ) -> AsyncIterator[SseMessage]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    async with client.stream("GET", "/api/sse", params={"session_id": session_id}, headers=headers,
                             timeout=httpx.Timeout(10.0, read=None)) as response:
        if response.status_code != 200:
            await response.aread()
            raise httpx.HTTPStatusError(f"stream refused: {response.status_code} {response.text}",
                                        request=response.request, response=response)
        async for message in parse_sse(response.aiter_lines()):
            yield message
