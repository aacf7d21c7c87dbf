"""Calls the integration tests make again and again against a live server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx

from service.client import SseMessage, parse_sse

STREAM_TIMEOUT = 20.0
"""The longest any test waits for a stream or a task: a bug fails the test instead of hanging it."""

TERMINAL = frozenset({"task_complete", "task_cancelled", "error"})
"""The events that end a task."""


async def submit(client: httpx.AsyncClient, task: str, session_id: str) -> str:
    """Submit a task (asserting 202); returns its id."""
    response = await client.post("/api/tasks", json={"task": task, "session_id": session_id})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


async def wait_finished(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    """Poll the task until it is no longer queued or running; returns it."""
    async with asyncio.timeout(STREAM_TIMEOUT):
        while True:
            task: dict[str, Any] = (await client.get(f"/api/tasks/{task_id}")).json()
            if task["status"] not in ("queued", "running"):
                return task
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def open_stream(client: httpx.AsyncClient, session_id: str, *, headers: dict[str, str] | None = None,
                      params: dict[str, str] | None = None) -> AsyncIterator[AsyncGenerator[SseMessage, None]]:
    """The session's stream, checked to open with ``connected`` (no id, its session); yields the messages after it."""
    async with client.stream("GET", "/api/sse", params={"session_id": session_id, **(params or {})},
                             headers={"Accept": "text/event-stream", **(headers or {})},
                             timeout=httpx.Timeout(10.0, read=None)) as response:
        assert response.status_code == 200, await response.aread()
        messages = parse_sse(response.aiter_lines())
        try:
            async with asyncio.timeout(STREAM_TIMEOUT):
                first = await anext(messages)
            assert (first.event, first.id, first.json()) == ("connected", None, {"session_id": session_id})
            yield messages
        finally:
            await messages.aclose()


async def count_until_terminal(messages: AsyncGenerator[SseMessage, None]) -> int:
    """Read a stream up to and including the event that ends a task; returns how many messages that was."""
    received = 0
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages:
            received += 1
            if message.event in TERMINAL:
                break
    return received


async def stored_events(client: httpx.AsyncClient, session_id: str, page_size: int = 200) -> list[dict[str, Any]]:
    """Every stored event of the session, paging through ``after``."""
    events: list[dict[str, Any]] = []
    after = "0"
    while True:
        response = await client.get(f"/api/sessions/{session_id}/events",
                                    params={"after": after, "limit": page_size})
        assert response.status_code == 200, response.text
        page = response.json()
        events.extend(page["events"])
        if page["next_after"] is None:
            return events
        after = page["next_after"]
