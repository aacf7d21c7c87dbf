"""One contract for every storage backend: the ``EventLog`` and ``SessionStore`` ports, run on each backend.

A backend is a factory in :data:`BACKENDS` (Redis runs on a real redis-server the module starts). The last
section holds what only the SQLite adapters promise beyond the ports (crash gap, write failures).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog

from service.adapters.broker.memory import MemoryBroker
from service.adapters.redis.client import ControlBus, connect
from service.adapters.redis.events import RedisEventLog
from service.adapters.redis.sessions import RedisSessionStore
from service.adapters.store import sqlite_events
from service.adapters.store.memory import MemoryEventLog, MemorySessionStore
from service.adapters.store.sqlite import SqliteDatabase
from service.adapters.store.sqlite_events import CRASH_ID_GAP, SqliteEventLog
from service.adapters.store.sqlite_sessions import SqliteSessionStore
from service.app.ports import STORE_UNAVAILABLE, EventLog, SessionStore, Subscription
from service.app.stream import SessionFeed
from service.domain.errors import Unavailable
from service.domain.events import StoredEvent, Thinking, ToolCallStart
from service.domain.models import Session, Task, TaskStatus, Todo, TodoStatus
from tests.redis_server import RedisServer, emptied, redis_server

RETENTION = 500
"""Small enough that a test can overflow it, large enough for the other tests; every backend is built with it."""

SLACK = max(1, RETENTION // 10)
"""How far past the retention a session may grow between two trims."""


# --- the backends -------------------------------------------------------------------------------------------------


@dataclass
class Backend:
    """An opened backend: its event log and session store, and how to close (and reopen) them."""

    log: EventLog
    store: SessionStore
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    reopener: Callable[[], Awaitable[Backend]] | None = None
    """Opens the same storage again; None for a backend that keeps nothing across a restart."""

    @property
    def persistent(self) -> bool:
        return self.reopener is not None

    async def aclose(self) -> None:
        closers, self.closers = self.closers, []
        for close in closers:
            await close()

    async def reopen(self) -> None:
        """Close everything, then open the same storage again, in place (persistent backends only)."""
        assert self.reopener is not None
        await self.aclose()
        reopened = await self.reopener()
        self.log, self.store, self.closers = reopened.log, reopened.store, reopened.closers


BackendFactory = Callable[[Path], Awaitable[Backend]]
"""Opens a backend whose files, if any, live under the given folder."""


async def memory_backend(tmp_path: Path) -> Backend:
    log = MemoryEventLog(MemoryBroker(), RETENTION)
    store = MemorySessionStore()
    return Backend(log, store, [log.close, store.close])


async def sqlite_backend(tmp_path: Path) -> Backend:
    db = await SqliteDatabase.open(tmp_path / "data" / "alex.db")
    log = await SqliteEventLog.open(db, MemoryBroker(), RETENTION)
    store = SqliteSessionStore(db)
    return Backend(log, store, [log.close, store.close, db.close], reopener=lambda: sqlite_backend(tmp_path))


async def redis_backend(url: str) -> Backend:
    """The Redis adapters on a real redis-server (one per test module, emptied before each test)."""
    redis = connect(url)
    reader = connect(url, blocking=True)
    bus = ControlBus(redis)
    bus.start()
    log = RedisEventLog(redis, reader, bus, "contract", retention=RETENTION, ttl_seconds=3600, backlog_limit=100)
    log.start()
    store = RedisSessionStore(redis)
    return Backend(log, store, [log.close, store.close, bus.close, reader.aclose, redis.aclose],
                   reopener=lambda: redis_backend(url))


@pytest.fixture(scope="module")
def contract_redis() -> Iterator[RedisServer]:
    with redis_server(persistent=False) as server:
        yield server


BACKENDS = [
    pytest.param(memory_backend, id="memory"),
    pytest.param(sqlite_backend, id="sqlite"),
    pytest.param(redis_backend, id="redis"),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param is redis_backend:
        server: RedisServer = request.getfixturevalue("contract_redis")
        opened = await redis_backend(await emptied(server))
    else:
        factory: BackendFactory = request.param
        opened = await factory(tmp_path)
    try:
        yield opened
    finally:
        await opened.aclose()


def thinking(session_id: str, n: int = 0, task_id: str = "t1") -> Thinking:
    return Thinking(session_id=session_id, task_id=task_id, delta=f"piece {n}", iteration=1, trace_id="tr")


def ids(events: list[StoredEvent]) -> list[int]:
    return [event.id for event in events]


async def subscribed(log: EventLog, session_id: str, buffer_size: int) -> Subscription:
    """A subscription that live events reach (``ready``: at once in-process, a round trip with Redis)."""
    subscription = log.subscribe(session_id, buffer_size)
    await subscription.ready()
    return subscription


async def take(subscription: Subscription, count: int) -> list[StoredEvent]:
    """The next ``count`` live events, however the log batches them (one replica's reader may split them)."""
    taken: list[StoredEvent] = []
    async with asyncio.timeout(5):
        while len(taken) < count:
            batch = await subscription.next_batch()
            assert batch, f"the subscription closed ({subscription.close_reason}) after {len(taken)} events"
            taken += batch
    return taken


# --- EventLog -----------------------------------------------------------------------------------------------------


async def test_ids_increase_within_each_session(backend: Backend) -> None:
    appended: dict[str, list[int]] = {"s1": [], "s2": []}
    for n in range(30):
        session_id = "s1" if n % 3 else "s2"
        appended[session_id].append((await backend.log.append(thinking(session_id, n))).id)
    for session_ids in appended.values():
        assert session_ids == sorted(session_ids)
        assert len(set(session_ids)) == len(session_ids)
    assert not set(appended["s1"]) & set(appended["s2"])


async def test_read_after_returns_later_events_oldest_first_at_most_limit(backend: Backend) -> None:
    appended = [await backend.log.append(thinking("s1", n)) for n in range(10)]
    every = ids(appended)
    assert ids(await backend.log.read_after("s1", 0, 100)) == every
    assert ids(await backend.log.read_after("s1", every[2], 3)) == every[3:6]
    assert ids(await backend.log.read_after("s1", every[7], 100)) == every[8:]
    assert await backend.log.read_after("s1", every[-1], 100) == []
    assert await backend.log.read_after("s1", 0, 0) == []
    assert await backend.log.read_after("nobody", 0, 100) == []


async def test_stored_events_read_back_as_appended(backend: Backend) -> None:
    event = ToolCallStart(
        session_id="s1",
        task_id="t1",
        tool_name="bash",
        call_id="c1",
        arguments={"command": "echo 'ü\n'"},
        iteration=2,
        trace_id="abc",
    )
    appended = await backend.log.append(event)
    [read] = await backend.log.read_after("s1", 0, 10)
    assert read == appended
    assert read.to_dict()["arguments"] == {"command": "echo 'ü\n'"}
    assert read.frame.startswith(f"id: {appended.id}\nevent: tool_call_start\n".encode())


async def test_an_appended_event_is_readable_at_once(backend: Backend) -> None:
    last = 0
    for n in range(40):
        appended = await backend.log.append(thinking("s1", n))
        assert ids(await backend.log.read_after("s1", last, 10)) == [appended.id]
        last = appended.id


async def test_subscribers_get_their_session_live(backend: Backend) -> None:
    mine = await subscribed(backend.log, "s1", 10)
    other = await subscribed(backend.log, "s2", 10)
    first = await backend.log.append(thinking("s1", 1))
    await backend.log.append(thinking("s2", 2))
    second = await backend.log.append(thinking("s1", 3))
    assert await take(mine, 2) == [first, second]
    assert len(await take(other, 1)) == 1
    mine.close()
    other.close()


async def test_read_after_sees_only_its_session(backend: Backend) -> None:
    for n in range(6):
        await backend.log.append(thinking("s1" if n % 2 else "s2", n))
    assert {event.session_id for event in await backend.log.read_after("s1", 0, 100)} == {"s1"}
    assert len(await backend.log.read_after("s2", 0, 100)) == 3


@pytest.mark.parametrize("subscribe_after", [0, 7, 60, 150])
async def test_subscribe_then_replay_has_no_gap_and_no_duplicate_while_appends_race(
    backend: Backend, subscribe_after: int
) -> None:
    log = backend.log
    total = 200  # below RETENTION: nothing is trimmed
    appended: list[int] = []
    started = asyncio.Event()

    async def writer() -> None:
        for n in range(total):
            appended.append((await log.append(thinking("s1", n))).id)
            await log.append(thinking("s2", n))  # another session's traffic in between
            if n == subscribe_after:
                started.set()
            await asyncio.sleep(0)

    writing = asyncio.create_task(writer())
    await started.wait()
    subscription = await subscribed(log, "s1", 10 * total)
    seen: list[int] = []
    last = 0
    while True:  # the replay, in pages, as a reconnecting reader does it, while the writer goes on
        page = await log.read_after("s1", last, 7)
        seen += ids(page)
        if page:
            last = page[-1].id
        if len(page) < 7:
            break
    await writing
    while last < appended[-1]:  # then live, skipping what the replay already gave
        batch = await asyncio.wait_for(subscription.next_batch(), 5)
        fresh = [event.id for event in batch if event.id > last]
        seen += fresh
        if fresh:
            last = fresh[-1]
    subscription.close()
    assert seen == appended
    assert subscription.dropped == 0


async def test_close_subscriptions_ends_every_reader(backend: Backend) -> None:
    subscription = await subscribed(backend.log, "s1", 10)
    reader = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    backend.log.close_subscriptions("draining")
    assert await asyncio.wait_for(reader, 5) == []
    assert subscription.close_reason == "draining"


async def test_a_slow_subscriber_is_cut_off_and_recovers_from_the_log(backend: Backend) -> None:
    subscription = await subscribed(backend.log, "s1", 3)
    appended = [await backend.log.append(thinking("s1", n)) for n in range(5)]
    async with asyncio.timeout(5):  # a replica's reader hands them on a moment later
        while True:
            if subscription.close_reason is not None:
                break
            await asyncio.sleep(0.01)
    assert subscription.close_reason == "slow_client"
    assert subscription.dropped == 4
    assert await subscription.next_batch() == []
    assert await backend.log.read_after("s1", 0, 100) == appended


async def test_a_reader_hears_when_half_its_buffer_is_pending(backend: Backend) -> None:
    subscription = await subscribed(backend.log, "s1", 8)
    calls: list[int] = []
    filling = asyncio.Event()

    def heard() -> None:
        calls.append(subscription.pending)
        filling.set()

    subscription.notify_when_filling(heard)
    for n in range(3):
        await backend.log.append(thinking("s1", n))
    await asyncio.sleep(0.05)  # a replica's reader hands them on a moment later
    assert calls == []
    for n in range(3, 6):
        await backend.log.append(thinking("s1", n))
    await asyncio.wait_for(filling.wait(), 5)
    assert calls[0] >= 4
    assert len(await take(subscription, 6)) == 6
    subscription.notify_when_filling(None)
    for n in range(6, 12):
        await backend.log.append(thinking("s1", n))
    await asyncio.sleep(0.05)
    assert len(calls) == 1, "no callback once it was removed"
    assert subscription.close_reason is None


async def test_a_waiting_reader_may_take_each_event_as_it_is_published(backend: Backend) -> None:
    subscription = await subscribed(backend.log, "s1", 8)
    offered: list[int] = []
    accept = True

    def offer(frame: bytes) -> bool:
        offered.append(int(frame.split(b"\n", 1)[0].removeprefix(b"id: ")))
        return accept

    subscription.write_through(offer)
    reading = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0.01)
    taken = [(await backend.log.append(thinking("s1", n))).id for n in range(3)]
    async with asyncio.timeout(5):
        while len(offered) < len(taken):  # noqa: ASYNC110  (a replica's reader hands them on a moment later)
            await asyncio.sleep(0.005)
    assert offered == taken
    assert (subscription.last_id, subscription.offered) == (taken[-1], 3), "the reader's place moved with them"
    assert subscription.pending == 0
    assert not reading.done(), "events taken by the offer wake nobody"
    accept = False
    refused = (await backend.log.append(thinking("s1", 3))).id
    behind = (await backend.log.append(thinking("s1", 4))).id
    got = await asyncio.wait_for(reading, 5)
    # A replica may hand the two on in separate turns. Nobody waits now, so the second, however late, is buffered.
    async with asyncio.timeout(5):
        while len(got) + subscription.pending < 2:  # noqa: ASYNC110  (the replica's reader hands it on)
            await asyncio.sleep(0.005)
    got += await take(subscription, 2 - len(got))
    assert [event.id for event in got] == [refused, behind]
    assert offered == [*taken, refused], "once one event is buffered, the next wait behind it"
    accept = True
    unread = (await backend.log.append(thinking("s1", 5))).id
    await asyncio.sleep(0.05)
    assert offered == [*taken, refused], "nothing is offered while the reader is not waiting"
    assert [event.id for event in await take(subscription, 1)] == [unread]
    subscription.write_through(None)
    reading = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0.01)
    last = (await backend.log.append(thinking("s1", 6))).id
    assert [event.id for event in await asyncio.wait_for(reading, 5)] == [last]
    assert offered == [*taken, refused]


async def test_retention_trims_the_oldest_events_of_a_session(backend: Backend) -> None:
    appended: list[int] = []
    for n in range(3 * RETENTION + 7):
        appended.append((await backend.log.append(thinking("s1", n))).id)
        if n % 13 == 0:  # reads in between, so a write-behind log writes (and trims) in several batches
            await backend.log.read_after("s1", appended[-1], 1)
    for n in range(5):
        await backend.log.append(thinking("s2", n))
    kept = ids(await backend.log.read_after("s1", 0, 10 * RETENTION))
    assert RETENTION <= len(kept) <= RETENTION + SLACK
    assert kept == appended[-len(kept) :]  # the newest ones, in order
    assert len(await backend.log.read_after("s2", 0, 100)) == 5  # another session is untouched


async def test_delete_session_removes_its_events_only(backend: Backend) -> None:
    for n in range(10):
        await backend.log.append(thinking("s1" if n % 2 else "s2", n))
    await backend.log.delete_session("s1")
    assert await backend.log.read_after("s1", 0, 100) == []
    assert len(await backend.log.read_after("s2", 0, 100)) == 5
    later = await backend.log.append(thinking("s1", 99))  # the id may be used again: a new, empty session
    assert await backend.log.read_after("s1", 0, 100) == [later]


@pytest.mark.parametrize("pause", [False, True])
async def test_delete_session_right_after_append_leaves_nothing(backend: Backend, pause: bool) -> None:
    for n in range(20):
        await backend.log.append(thinking("s1", n))
    if pause:  # lets a write-behind log start writing them: the delete then races the write
        await asyncio.sleep(0)
    await backend.log.delete_session("s1")  # no read before: a write-behind log may not have written them yet
    assert await backend.log.read_after("s1", 0, 100) == []
    await asyncio.sleep(0.01)
    assert await backend.log.read_after("s1", 0, 100) == []


async def test_a_read_racing_a_delete_finishes(backend: Backend) -> None:
    await backend.log.append(thinking("s2"))
    await asyncio.sleep(0)  # a write-behind log is busy writing this one while the next ones queue up
    appended = [await backend.log.append(thinking("s1", n)) for n in range(3)]
    read, _ = await asyncio.wait_for(
        asyncio.gather(backend.log.read_after("s1", 0, 10), backend.log.delete_session("s1")), 5)
    assert read in ([], appended)  # before or after the delete, never half of it


# --- SessionStore -------------------------------------------------------------------------------------------------


def task(task_id: str, session_id: str = "s1", **changes: object) -> Task:
    created = datetime(2025, 10, 2, 10, 0, 0, 123456, tzinfo=UTC)
    made = Task(
        id=task_id, session_id=session_id, owner="alice", text=f"do {task_id}", created_at=created, trace_id="4bf9"
    )
    for name, value in changes.items():
        setattr(made, name, value)
    return made


async def test_create_session_is_idempotent_and_returns_the_holder(backend: Backend) -> None:
    created = await backend.store.create_session(Session(id="s1", owner="alice"))
    assert created.owner == "alice"
    again = await backend.store.create_session(Session(id="s1", owner="bob"))
    assert again.owner == "alice"
    assert again.created_at == created.created_at
    assert await backend.store.get_session("nobody") is None


async def test_concurrent_creates_agree_on_one_owner(backend: Backend) -> None:
    owners = [f"user{n}" for n in range(10)]
    results = await asyncio.gather(*(backend.store.create_session(Session(id="s1", owner=o)) for o in owners))
    assert len({session.owner for session in results}) == 1


async def test_list_sessions_oldest_first_by_owner(backend: Backend) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    for name, owner, minutes in (("b", "alice", 2), ("a", "alice", 1), ("c", "bob", 0), ("d", "alice", 3)):
        await backend.store.create_session(Session(id=name, owner=owner, created_at=start + timedelta(minutes=minutes)))
    assert await backend.store.list_sessions("alice") == ["a", "b", "d"]
    assert await backend.store.list_sessions(None) == ["c", "a", "b", "d"]
    assert await backend.store.list_sessions("nobody") == []


async def test_messages_and_todos_round_trip_and_bump_updated_at(backend: Backend) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    await backend.store.create_session(Session(id="s1", owner="alice", created_at=old, updated_at=old))
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "héllo"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "arguments": "{}"}]},
    ]
    await backend.store.save_messages("s1", messages)
    session = await backend.store.get_session("s1")
    assert session is not None
    assert session.messages == messages
    assert session.updated_at > old
    assert session.created_at == old

    todos = [Todo("1", "write tests", TodoStatus.IN_PROGRESS), Todo("2", "ship")]
    await backend.store.set_todos("s1", todos)
    assert await backend.store.get_todos("s1") == todos
    session = await backend.store.get_session("s1")
    assert session is not None
    assert session.todos == todos
    assert session.messages == messages
    assert await backend.store.get_todos("nobody") == []
    await backend.store.save_messages("nobody", messages)  # a deleted session: nothing happens
    await backend.store.set_todos("nobody", todos)
    assert await backend.store.get_session("nobody") is None


async def test_what_is_returned_is_a_copy(backend: Backend) -> None:
    await backend.store.create_session(Session(id="s1", owner="alice", messages=[{"role": "user"}]))
    session = await backend.store.get_session("s1")
    assert session is not None
    session.messages.append({"role": "intruder"})
    await backend.store.create_task(task("t1"))
    fetched = await backend.store.get_task("t1")
    assert fetched is not None
    fetched.usage["total_tokens"] = 999
    again = await backend.store.get_session("s1")
    assert again is not None
    assert again.messages == [{"role": "user"}]
    refetched = await backend.store.get_task("t1")
    assert refetched is not None
    assert refetched.usage["total_tokens"] == 0


async def test_tasks_round_trip_with_times_and_usage(backend: Backend) -> None:
    plus_two = timezone(timedelta(hours=2))
    original = task(
        "t1", status=TaskStatus.RUNNING, started_at=datetime(2025, 10, 2, 12, 0, 1, 999999, tzinfo=plus_two)
    )
    await backend.store.create_task(original)
    stored = await backend.store.get_task("t1")
    assert stored == original
    assert stored is not None
    assert stored.started_at is not None
    assert stored.created_at.utcoffset() == timedelta(0)
    assert stored.started_at.utcoffset() == timedelta(0)
    assert stored.finished_at is None

    original.status = TaskStatus.COMPLETED
    original.finished_at = datetime(2025, 10, 2, 10, 0, 5, 1, tzinfo=UTC)
    original.final_answer = "done ✓"
    original.iterations = 3
    original.usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    await backend.store.update_task(original)
    assert await backend.store.get_task("t1") == original
    assert await backend.store.get_task("nobody") is None
    await backend.store.update_task(task("nobody"))  # gone with its session: nothing happens
    assert await backend.store.get_task("nobody") is None
    with pytest.raises(ValueError, match="exists"):
        await backend.store.create_task(task("t1"))


async def test_find_tasks_by_status(backend: Backend) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    await backend.store.create_task(task("t3", status=TaskStatus.RUNNING, created_at=base + timedelta(seconds=3)))
    await backend.store.create_task(task("t1", status=TaskStatus.QUEUED, created_at=base + timedelta(seconds=1)))
    await backend.store.create_task(task("t2", status=TaskStatus.COMPLETED, created_at=base + timedelta(seconds=2)))
    await backend.store.create_task(task("t4", "s2", status=TaskStatus.RUNNING))
    found = await backend.store.find_tasks("s1", [TaskStatus.QUEUED, TaskStatus.RUNNING])
    assert [t.id for t in found] == ["t1", "t3"]
    assert [t.id for t in await backend.store.find_tasks("s1", [TaskStatus.COMPLETED])] == ["t2"]
    assert await backend.store.find_tasks("s1", []) == []
    assert await backend.store.find_tasks("s1", [TaskStatus.FAILED]) == []


async def test_interrupt_unfinished_tasks(backend: Backend) -> None:
    await backend.store.create_task(task("queued", status=TaskStatus.QUEUED))
    await backend.store.create_task(task("running", "s2", status=TaskStatus.RUNNING))
    done = task("done", status=TaskStatus.COMPLETED, final_answer="42")
    await backend.store.create_task(done)
    before = datetime.now(UTC)
    interrupted = await backend.store.interrupt_unfinished_tasks("server restarted")
    assert sorted(t.id for t in interrupted) == ["queued", "running"]
    for returned in interrupted:
        assert returned.status is TaskStatus.INTERRUPTED
        assert returned.error == "server restarted"
        assert returned.finished_at is not None
        assert returned.finished_at >= before - timedelta(seconds=1)
        assert await backend.store.get_task(returned.id) == returned
    assert await backend.store.get_task("done") == done
    assert await backend.store.interrupt_unfinished_tasks("again") == []


async def test_delete_session_takes_its_tasks(backend: Backend) -> None:
    await backend.store.create_session(Session(id="s1", owner="alice"))
    await backend.store.create_session(Session(id="s2", owner="alice"))
    await backend.store.create_task(task("t1"))
    await backend.store.create_task(task("t2", "s2"))
    await backend.store.delete_session("s1")
    assert await backend.store.get_session("s1") is None
    assert await backend.store.get_task("t1") is None
    assert await backend.store.get_task("t2") is not None
    assert await backend.store.list_sessions(None) == ["s2"]


async def test_ping_answers(backend: Backend) -> None:
    await backend.store.ping()


# --- persistence (backends that keep data) ------------------------------------------------------------------------


async def test_everything_survives_a_reopen(backend: Backend) -> None:
    if not backend.persistent:
        pytest.skip("this backend keeps nothing across a restart")
    await backend.store.create_session(Session(id="s1", owner="alice", messages=[{"role": "user", "content": "hi"}]))
    await backend.store.set_todos("s1", [Todo("1", "remember")])
    original = task("t1", status=TaskStatus.RUNNING, started_at=datetime(2025, 10, 2, 10, 0, 1, tzinfo=UTC))
    await backend.store.create_task(original)
    appended = [await backend.log.append(thinking("s1", n)) for n in range(5)]
    top = (await backend.log.append(thinking("s2", 9))).id
    await backend.log.delete_session("s2")  # the highest id goes: it must not be given again

    await backend.reopen()
    reopened = backend
    session = await reopened.store.get_session("s1")
    assert session is not None
    assert session.owner == "alice"
    assert session.messages == [{"role": "user", "content": "hi"}]
    assert session.todos == [Todo("1", "remember")]
    assert await reopened.store.get_task("t1") == original
    assert await reopened.log.read_after("s1", 0, 100) == appended
    assert (await reopened.log.append(thinking("s1", 6))).id > top


# --- SQLite only: what the SQLite adapters promise beyond the ports -----------------------------------------------


async def test_sqlite_skips_ids_after_an_unclean_stop(tmp_path: Path) -> None:
    path = tmp_path / "alex.db"
    first_db = await SqliteDatabase.open(path)
    first = await SqliteEventLog.open(first_db, MemoryBroker(), RETENTION)
    top = (await first.append(thinking("s1"))).id
    await first.flush()
    # A second log opens while the first was never closed: to it, the first crashed, and ids the first handed
    # out live but had not written yet must not come again.
    second_db = await SqliteDatabase.open(path)
    second = await SqliteEventLog.open(second_db, MemoryBroker(), RETENTION)
    try:
        assert (await second.append(thinking("s1"))).id > top + CRASH_ID_GAP - 1
    finally:
        await second.close()
        await second_db.close()
        await first.close()
        await first_db.close()
    # Both closed cleanly: the next start continues right above the highest id.
    db = await SqliteDatabase.open(path)
    log = await SqliteEventLog.open(db, MemoryBroker(), RETENTION)
    try:
        assert (await log.append(thinking("s1"))).id < top + 2 * CRASH_ID_GAP
    finally:
        await log.close()
        await db.close()


async def test_sqlite_rows_carry_the_events_own_timestamp(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "alex.db")
    log = await SqliteEventLog.open(db, MemoryBroker(), RETENTION)
    try:
        appended = [await log.append(thinking("s1", n)) for n in range(3)]
        await log.flush()
        rows = await db.run(lambda c: c.execute("SELECT id, created_at FROM events ORDER BY id").fetchall())
    finally:
        await log.close()
        await db.close()
    assert [tuple(row) for row in rows] == [(event.id, event.to_dict()["timestamp"]) for event in appended]


@pytest.fixture
async def locked_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[SqliteEventLog, sqlite3.Connection]]:
    """A log whose writes fail (another connection holds the write lock) until the test commits that lock."""
    monkeypatch.setattr(sqlite_events, "RETRY_DELAY_SECONDS", 0.01)
    path = tmp_path / "alex.db"
    db = await SqliteDatabase.open(path, busy_timeout_ms=20)
    log = await SqliteEventLog.open(db, MemoryBroker(), RETENTION)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield log, blocker
    finally:
        if blocker.in_transaction:
            blocker.execute("COMMIT")
        blocker.close()
        await log.close()
        await db.close()


async def test_sqlite_retries_a_failed_batch(locked_sqlite: tuple[SqliteEventLog, sqlite3.Connection],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_events, "RETRY_DELAY_SECONDS", 0.2)  # room to unlock before the retries run out
    log, blocker = locked_sqlite
    with structlog.testing.capture_logs() as logs:
        live = log.subscribe("s1", 100)
        appended = [await log.append(thinking("s1", n)) for n in range(3)]
        assert await live.next_batch() == appended  # live delivery does not wait for the disk
        async with asyncio.timeout(5):
            # The failure is only visible in the log lines, hence the polling.
            while not any(entry["event"] == "event_batch_write_failed" for entry in logs):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        blocker.execute("COMMIT")
        assert await log.read_after("s1", 0, 100) == appended
    assert not any(entry["event"] == "event_batch_lost" for entry in logs)
    live.close()


async def test_sqlite_gives_up_a_batch_loudly_and_goes_on(
    locked_sqlite: tuple[SqliteEventLog, sqlite3.Connection],
) -> None:
    log, blocker = locked_sqlite
    with structlog.testing.capture_logs() as logs:
        lost = await log.append(thinking("s1", 0))
        with pytest.raises(Unavailable):
            await log.read_after("s1", 0, 100)
        assert next(entry for entry in logs if entry["event"] == "event_batch_lost")["last_id"] == lost.id
        blocker.execute("COMMIT")
        kept = await log.append(thinking("s1", 1))
        assert await log.read_after("s1", 0, 100) == [kept]


async def test_a_stream_whose_replay_waited_on_a_lost_batch_ends_for_a_resume(
    locked_sqlite: tuple[SqliteEventLog, sqlite3.Connection],
) -> None:
    log, blocker = locked_sqlite
    with structlog.testing.capture_logs() as logs:
        await log.append(thinking("s1", 0))
        feed = SessionFeed(log, "s1", 0, 100)
        assert await feed.next() == []  # ended, not an error out of the stream
        assert (feed.close_reason, feed.last_id) == (STORE_UNAVAILABLE, 0)
    assert next(entry for entry in logs if entry["event"] == "event_replay_failed")["session_id"] == "s1"
    blocker.execute("COMMIT")
    kept = await log.append(thinking("s1", 1))
    resumed = SessionFeed(log, "s1", feed.last_id, 100)
    assert await resumed.next() == [kept]
    resumed.close()


@pytest.fixture
async def sqlite_log(tmp_path: Path) -> AsyncIterator[tuple[SqliteEventLog, Path]]:
    path = tmp_path / "alex.db"
    db = await SqliteDatabase.open(path)
    log = await SqliteEventLog.open(db, MemoryBroker(), RETENTION)
    try:
        yield log, path
    finally:
        await log.close()
        await db.close()


@pytest.mark.parametrize("count", [1, 3, 4, 17, 64, 85, 150])
async def test_sqlite_writes_a_batch_of_any_size_once_each(sqlite_log: tuple[SqliteEventLog, Path],
                                                          count: int) -> None:
    # Appends in one turn of the loop go into one batch, which is cut into multi-row statements of a few sizes.
    log, path = sqlite_log
    appended = [await log.append(thinking(f"s{n % 3}", n)) for n in range(count)]
    await log.flush()
    for session in ("s0", "s1", "s2"):
        assert await log.read_after(session, 0, 1000) == [e for e in appended if e.session_id == session]
    reader = sqlite3.connect(path)
    try:
        assert reader.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM events").fetchone() == (count, count)
    finally:
        reader.close()


async def test_sqlite_gathers_appends_until_a_reader_waits(
    sqlite_log: tuple[SqliteEventLog, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_events, "GROUP_COMMIT_SECONDS", 60.0)
    log, _ = sqlite_log
    first = await log.append(thinking("s1", 0))
    await asyncio.sleep(0.1)
    assert log.queued == 1, "nobody waits for the row: the flusher is still gathering"
    async with asyncio.timeout(5):
        assert await log.read_after("s1", 0, 10) == [first]  # the reader cut the gathering short
    second = await log.append(thinking("s1", 1))
    await asyncio.sleep(0.1)
    assert log.queued == 1, "the next transaction waits its time again"
    async with asyncio.timeout(5):
        await log.flush()
        assert log.queued == 0
        third = await log.append(thinking("s2", 2))
        await log.delete_session("s1")
        assert await log.read_after("s1", 0, 10) == []
        assert await log.read_after("s2", 0, 10) == [third]
    assert second.id < third.id
