"""Fixtures that start the real server (a child process on 127.0.0.1:0) and clients that talk to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.integration.server import ServerProcess, auth, running


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    """A server on its embedded defaults (SQLite, in-process broker) with the mock model at zero delay."""
    with running() as process:
        yield process


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=30.0) as http:
        yield http
