"""Fixtures that start the real server (a child process on 127.0.0.1:0) and clients that talk to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.server import ServerProcess, auth


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server on its embedded defaults (SQLite, in-process broker) with the mock model at zero delay."""
    process = ServerProcess(tmp_path / "data").start()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=30.0) as http:
        yield http
