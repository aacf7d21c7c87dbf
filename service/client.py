"""A small client of the service's own API: Server-Sent Events parsing and a task follower (``alex-server run``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
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


async def parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseMessage]:
    """Messages from an ``text/event-stream`` body, per the WHATWG rules; comments (heartbeats) are skipped."""
    event, last_id = "", None
    data: list[str] = []
    async for line in lines:
        if line == "":
            if data:
                yield SseMessage(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value


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
