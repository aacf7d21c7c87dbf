"""What the Redis adapters do while Redis is away: a real redis-server stopped and started again (its data and port
kept), under a ``RedisEventLog`` and a ``RedisSessionStore``.

Appends made while Redis is down wait in the log's backlog, in order, and are written once it answers; reads and
new subscriptions fail with :class:`Unavailable` (503) rather than show a history with a hole, and open
subscriptions end so their clients resume elsewhere. Past the backlog's bound only a task's final event is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from service.adapters.redis.client import ControlBus, connect
from service.adapters.redis.events import REDIS_UNAVAILABLE, RedisEventLog
from service.adapters.redis.sessions import RedisSessionStore
from service.app.ports import STORE_UNAVAILABLE, Subscription
from service.app.stream import SessionFeed
from service.domain.errors import Unavailable
from service.domain.events import StoredEvent, TaskCancelled, TaskComplete, Thinking
from tests.redis_server import RedisServer, redis_server

BACKLOG_LIMIT = 5


@dataclass
class Opened:
    log: RedisEventLog
    store: RedisSessionStore
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with redis_server(persistent=True) as started:
        yield started


@pytest.fixture
async def opened(server: RedisServer) -> AsyncIterator[Opened]:
    redis = connect(server.url)
    reader = connect(server.url, blocking=True)
    bus = ControlBus(redis)
    bus.start()
    log = RedisEventLog(redis, reader, bus, "outage", retention=1000, ttl_seconds=3600, backlog_limit=BACKLOG_LIMIT)
    log.start()
    store = RedisSessionStore(redis)
    backend = Opened(log, store, [log.close, bus.close, store.close, reader.aclose, redis.aclose])
    try:
        yield backend
    finally:
        for close in backend.closers:
            await close()


def thinking(n: int, session_id: str = "s1") -> Thinking:
    return Thinking(session_id=session_id, task_id="t1", delta=f"piece {n}", iteration=1, trace_id="tr")


def deltas(events: list[StoredEvent]) -> list[str]:
    return [json.loads(event.data).get("delta", event.event_type) for event in events]


def assert_increasing(events: list[StoredEvent]) -> None:
    ids = [event.id for event in events]
    assert all(0 < earlier < later for earlier, later in itertools.pairwise(ids)), ids


async def backlog_written(log: RedisEventLog) -> None:
    async with asyncio.timeout(10):
        while log.backlog:  # noqa: ASYNC110  (the log's flusher retries on its own clock)
            await asyncio.sleep(0.05)


async def closed(subscription: Subscription) -> str | None:
    async with asyncio.timeout(5):
        while subscription.close_reason is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert await subscription.next_batch() == []  # nothing pending: it ends at once
    return subscription.close_reason


async def live(log: RedisEventLog, session_id: str) -> Subscription:
    """A subscription that live events reach, once the log's reader follows streams again."""
    async with asyncio.timeout(10):
        while True:
            subscription = log.subscribe(session_id, 100)
            with contextlib.suppress(Unavailable):
                await subscription.ready()
            if subscription.close_reason is None:
                return subscription
            subscription.close()
            await asyncio.sleep(0.05)


async def test_appends_wait_for_redis_and_are_written_in_order(opened: Opened, server: RedisServer) -> None:
    log = opened.log
    before = [await log.append(thinking(n)) for n in range(3)]
    assert_increasing(before)
    following = await live(log, "s1")

    server.stop()
    during = [await log.append(thinking(n)) for n in range(3, 6)]
    assert [event.id for event in during] == [0, 0, 0]  # held: the id comes when it is written
    assert log.backlog == 3
    assert await closed(following) == REDIS_UNAVAILABLE
    with pytest.raises(Unavailable):
        await log.read_after("s1", 0, 100)
    assert await closed(log.subscribe("s1", 100)) == REDIS_UNAVAILABLE  # new streams end at once too

    server.start()
    after = await log.append(thinking(6))  # behind the backlog, not before it
    assert after.id == 0
    await backlog_written(log)
    stored = await log.read_after("s1", 0, 100)
    assert deltas(stored) == [f"piece {n}" for n in range(7)]
    assert stored[:3] == before
    assert_increasing(stored)

    again = await live(log, "s1")  # live delivery is back
    appended = await log.append(thinking(7))
    assert appended.id > stored[-1].id
    async with asyncio.timeout(5):
        assert await again.next_batch() == [appended]
    again.close()


async def test_past_the_backlog_limit_only_a_tasks_final_event_is_taken(opened: Opened, server: RedisServer) -> None:
    log = opened.log
    first = await log.append(thinking(0))
    server.stop()
    for n in range(1, BACKLOG_LIMIT + 1):
        await log.append(thinking(n))
    assert log.backlog == BACKLOG_LIMIT
    with pytest.raises(Unavailable):
        await log.append(thinking(99))
    complete = TaskComplete(session_id="s1", task_id="t1", final_answer="42", total_iterations=1, total_tokens=5,
                            duration=10)
    assert (await log.append(complete)).id == 0
    assert (await log.append(TaskCancelled(session_id="s1", task_id="t2", reason="stop"))).id == 0
    assert log.backlog == BACKLOG_LIMIT + 2

    server.start()
    await backlog_written(log)
    stored = await log.read_after("s1", 0, 100)
    assert stored[0] == first
    assert deltas(stored) == [f"piece {n}" for n in range(BACKLOG_LIMIT + 1)] + ["task_complete", "task_cancelled"]
    assert_increasing(stored)


async def test_a_feed_whose_history_cannot_be_read_ends_and_a_resume_later_has_it_all(
        opened: Opened, server: RedisServer) -> None:
    log = opened.log
    stored = [await log.append(thinking(n)) for n in range(3)]
    feed = SessionFeed(log, "s1", 0, 100)
    server.stop()
    # Not an error out of the stream, and no skipping ahead: the feed ends, its reader resumes from its last id.
    assert await feed.next() == []
    # Whichever saw Redis gone first: the failed read, or the log's reader, which ends every subscription.
    assert feed.close_reason in (STORE_UNAVAILABLE, REDIS_UNAVAILABLE)
    assert feed.last_id == 0

    server.start()
    async with asyncio.timeout(10):
        while True:
            resumed = SessionFeed(log, "s1", feed.last_id, 100)
            page = await resumed.next()
            if page:
                break
            await asyncio.sleep(0.05)  # redis-server does not take connections yet
    assert page == stored
    resumed.close()


async def test_the_session_store_ping_fails_while_redis_is_down(opened: Opened, server: RedisServer) -> None:
    await opened.store.ping()
    server.stop()
    with pytest.raises(Unavailable):
        await opened.store.ping()
    server.start()
    await opened.store.ping()
