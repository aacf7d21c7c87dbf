"""The shared Redis client's pool, against a real redis-server: a burst of commands larger than the pool waits for
connections instead of failing, the pool never opens more than it may, and a command that waits too long for one
is Redis being unavailable (503), like any other unreachable Redis.

redis-py's own pool (8.x) refuses a command at once when its 100 connections are busy (``MaxConnectionsError``): a
thousand streams replaying at once after a deploy ended some of them so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from service.adapters.redis.client import POOL_WAIT_SECONDS, ControlBus, connect, reachable
from service.adapters.redis.events import RedisEventLog
from service.domain.errors import Unavailable
from service.domain.events import Thinking
from tests.redis_server import RedisServer, redis_server, service_connections

POOL = 4


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server(persistent=False) as started:
        yield started


@pytest.fixture
async def small_pool(server: RedisServer) -> AsyncIterator[Redis]:
    redis = connect(server.url, max_connections=POOL)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_a_burst_of_reads_larger_than_the_pool_waits_for_connections(server: RedisServer,
                                                                          small_pool: Redis) -> None:
    reader = connect(server.url, blocking=True)
    bus = ControlBus(small_pool)
    log = RedisEventLog(small_pool, reader, bus, "pool", retention=1000, ttl_seconds=3600, backlog_limit=10)
    try:
        appended = [await log.append(Thinking(session_id="burst", task_id="t1", delta=f"piece {n}", iteration=1))
                    for n in range(5)]
        # 50 times the pool: with redis-py's own pool every read past its size failed at once.
        pages = await asyncio.gather(*(log.read_after("burst", 0, 100) for _ in range(POOL * 50)))
        assert all(page == appended for page in pages)
        # The pool's connections, and none of the blocking reader's (it has not been used).
        assert 1 <= await service_connections(server) <= POOL
    finally:
        await log.close()
        await reader.aclose()


async def test_a_command_that_waits_too_long_for_a_connection_is_unavailable(small_pool: Redis) -> None:
    pool: Any = small_pool.connection_pool
    assert pool.timeout == POOL_WAIT_SECONDS
    pool.timeout = 0.2  # not the 5 s a test would wait
    # Every connection busy for a second, on a list nobody pushes to.
    async def hold(n: int) -> object:
        return await small_pool.blpop([f"nothing-{n}"], timeout=1)

    holders = [asyncio.create_task(hold(n)) for n in range(POOL)]
    await asyncio.sleep(0.1)
    try:
        started = time.monotonic()
        # Waited for a connection, then gave up (a pool that refuses at once says MaxConnectionsError).
        with pytest.raises(Unavailable, match=r"Redis is unavailable \(ConnectionError\)"), reachable("read"):
            await small_pool.get("anything")
        assert time.monotonic() - started >= 0.2
    finally:
        assert await asyncio.gather(*holders) == [None] * POOL
    assert await small_pool.get("anything") is None  # free again: served at once
