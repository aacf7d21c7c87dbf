"""One contract for every ``ClientStreams``: the in-process counter and the Redis one, each through the port.

The Redis one runs on a real redis-server the module starts (emptied before each test). Its ``release`` completes
in the background, so a test that needs the freed place waits for it (:func:`acquired`). The last section holds
what only the Redis counter promises: every replica sees one count, and a dead replica's streams stop counting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from service.adapters.redis import limits as redis_limits
from service.adapters.redis.client import connect
from service.adapters.redis.limits import RedisClientStreams
from service.app.ports import ClientStreams
from service.app.sessions import LocalClientStreams
from service.domain.errors import LimitExceeded
from tests.redis_server import RedisServer, emptied, redis_server

LIMIT = 3


@pytest.fixture(scope="module")
def streams_redis() -> Iterator[RedisServer]:
    with redis_server(persistent=False) as server:
        yield server



class Counters:
    """Replicas' counters on one Redis, each with its own client."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._opened: list[tuple[RedisClientStreams, Callable[[], Awaitable[None]]]] = []

    def open(self) -> RedisClientStreams:
        redis = connect(self.url)
        counter = RedisClientStreams(redis)
        counter.start()
        self._opened.append((counter, redis.aclose))
        return counter

    async def aclose(self) -> None:
        opened, self._opened = self._opened, []
        for counter, close_client in opened:
            await close_counter(counter)
            await close_client()


async def close_counter(counter: RedisClientStreams) -> None:
    """``counter.close()``, with a second cancel for a refresh loop that lost the first: on Python 3.11 a cancel
    that lands while redis-py sends a command can be lost (``asyncio.wait_for``, CPython issue #86296)."""
    await asyncio.wait_for(counter.close(), 2)


@pytest.fixture
async def counters(streams_redis: RedisServer) -> AsyncIterator[Counters]:
    opened = Counters(await emptied(streams_redis))
    try:
        yield opened
    finally:
        await opened.aclose()


@pytest.fixture(params=["local", "redis"])
async def streams(request: pytest.FixtureRequest) -> AsyncIterator[ClientStreams]:
    if request.param == "local":
        yield LocalClientStreams()
        return
    opened = Counters(await emptied(request.getfixturevalue("streams_redis")))
    try:
        yield opened.open()
    finally:
        await opened.aclose()


async def refused(streams: ClientStreams, subject: str, stream_id: str, limit: int = LIMIT) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as refusal:
        await streams.acquire(subject, stream_id, limit)
    return refusal.value


async def acquired(streams: ClientStreams, subject: str, stream_id: str, limit: int = LIMIT) -> None:
    """Acquire once a place is free: a release may complete in the background, shortly after it returned."""
    async with asyncio.timeout(2):
        while True:
            try:
                await streams.acquire(subject, stream_id, limit)
            except LimitExceeded:
                await asyncio.sleep(0.02)
            else:
                return


async def settled() -> None:
    """Time for releases running in the background to have completed."""
    await asyncio.sleep(0.2)


# --- the ClientStreams contract -----------------------------------------------------------------------------------


async def test_acquire_up_to_the_limit_then_refuse_with_retry_after(streams: ClientStreams) -> None:
    for n in range(LIMIT):
        await streams.acquire("alice", f"a{n}", LIMIT)
    refusal = await refused(streams, "alice", "a-extra")
    assert refusal.retry_after == 5
    assert "streams" in str(refusal)


async def test_release_frees_one_place(streams: ClientStreams) -> None:
    for n in range(LIMIT):
        await streams.acquire("alice", f"a{n}", LIMIT)
    streams.release("alice", "a0")
    await acquired(streams, "alice", "a3")
    await refused(streams, "alice", "a4")


async def test_the_count_is_per_subject(streams: ClientStreams) -> None:
    for n in range(LIMIT):
        await streams.acquire("alice", f"a{n}", LIMIT)
    for n in range(LIMIT):
        await streams.acquire("bob", f"b{n}", LIMIT)  # alice at her limit takes nothing from bob
    await refused(streams, "bob", "b-extra")
    streams.release("bob", "b0")
    await acquired(streams, "bob", "b3")
    await refused(streams, "alice", "a-extra")  # bob's release freed nothing of alice's


async def test_release_of_an_unknown_stream_is_harmless(streams: ClientStreams) -> None:
    streams.release("carol", "never-acquired")  # a subject with nothing open
    for n in range(LIMIT):
        await streams.acquire("alice", f"a{n}", LIMIT)
    streams.release("alice", "never-acquired")
    await settled()
    await refused(streams, "alice", "a-extra")  # alice still has LIMIT open
    for n in range(LIMIT):
        await streams.acquire("carol", f"c{n}", LIMIT)  # carol counts from zero, not from below it
    await refused(streams, "carol", "c-extra")


async def test_releasing_a_stream_twice_frees_one_place(streams: ClientStreams) -> None:
    for n in range(LIMIT):
        await streams.acquire("alice", f"a{n}", LIMIT)
    streams.release("alice", "a0")
    streams.release("alice", "a0")
    await acquired(streams, "alice", "a3")
    await settled()
    await refused(streams, "alice", "a4")


# --- Redis only: one count for every replica ----------------------------------------------------------------------


async def test_replicas_share_the_count(counters: Counters) -> None:
    first, second = counters.open(), counters.open()
    await first.acquire("alice", "a0", LIMIT)
    await first.acquire("alice", "a1", LIMIT)
    await second.acquire("alice", "a2", LIMIT)
    await refused(second, "alice", "a3")
    await refused(first, "alice", "a3")
    first.release("alice", "a0")
    await acquired(second, "alice", "a3")
    await refused(first, "alice", "a4")


async def test_a_dead_replicas_streams_stop_counting_a_live_ones_do_not(
    counters: Counters, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_limits, "STREAM_ENTRY_SECONDS", 0.3)
    live, dying, other = counters.open(), counters.open(), counters.open()
    await live.acquire("alice", "a0", 2)
    await dying.acquire("alice", "a1", 2)
    await close_counter(dying)  # it dies: it stops refreshing its entries, and never releases them
    await asyncio.sleep(0.6)
    await other.acquire("alice", "a2", 2)  # the dead replica's stream lapsed
    await refused(other, "alice", "a3", 2)  # the live replica's did not: it refreshes it
