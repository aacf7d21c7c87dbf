"""A deleted session's id can be claimed by anyone: nothing of the new owner's may reach the old owner's streams."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.client import follow
from tests.integration.server import ServerProcess, auth

pytestmark = pytest.mark.integration


async def test_deleting_a_session_ends_its_streams_and_its_id_leaks_nothing_to_a_new_owner(
    server: ServerProcess,
) -> None:
    async with (
        httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=30) as alice,
        httpx.AsyncClient(base_url=server.base_url, headers=auth("bob"), timeout=30) as bob,
    ):
        seen_by_alice: list[str] = []
        connected = asyncio.Event()

        async def alice_watches() -> None:
            async for message in follow(alice, "reused"):
                if message.event == "connected":
                    connected.set()
                    continue
                seen_by_alice.append(message.data)

        watcher = asyncio.create_task(alice_watches())
        async with asyncio.timeout(10):
            await connected.wait()
        assert (await alice.delete("/api/sessions/reused")).status_code == 204
        async with asyncio.timeout(10):
            await watcher  # the delete ended alice's stream

        done = asyncio.Event()

        async def bob_works() -> None:
            async for message in follow(bob, "reused"):
                if message.event == "connected":
                    response = await bob.post("/api/tasks", json={"task": "$ echo bob-secret", "session_id": "reused"})
                    assert response.status_code == 202
                elif message.event == "task_complete":
                    done.set()
                    return

        async with asyncio.timeout(20):
            await bob_works()
        assert done.is_set()
        assert not any("bob-secret" in data for data in seen_by_alice)
        assert (await alice.get("/api/sessions/reused")).status_code == 404
        assert (await alice.get("/api/sse", params={"session_id": "reused"})).status_code == 404
