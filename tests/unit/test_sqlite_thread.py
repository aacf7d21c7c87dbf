"""The SQLite connection's own thread: calls run one at a time in the order sent, their answers (and errors) reach
the callers, a call cancelled before it started never runs, and closing runs what was sent first."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.adapters.store.sqlite import MEMORY, DatabaseThread, SqliteDatabase


@pytest.fixture
async def thread() -> AsyncIterator[DatabaseThread]:
    """A database thread named ``test-db`` on the test's loop, stopped after the test."""
    database_thread = DatabaseThread("test-db", asyncio.get_running_loop())
    try:
        yield database_thread
    finally:
        database_thread.stop()


async def test_calls_run_in_order_on_one_thread_and_answer_their_callers(thread: DatabaseThread) -> None:
    seen: list[tuple[int, str]] = []

    def call(number: int) -> int:
        seen.append((number, threading.current_thread().name))
        return number * 10

    answers = await asyncio.gather(*(thread.submit(functools.partial(call, n)) for n in range(50)))
    assert answers == [n * 10 for n in range(50)]
    assert seen == [(n, "test-db") for n in range(50)]


async def test_an_error_reaches_its_caller_and_the_next_call_runs(thread: DatabaseThread) -> None:
    def fail() -> None:
        raise ValueError("no such row")

    failing = thread.submit(fail)
    after = thread.submit(lambda: "still here")
    with pytest.raises(ValueError, match="no such row"):
        await failing
    assert await after == "still here"


async def test_a_call_cancelled_before_it_started_never_runs(thread: DatabaseThread) -> None:
    gate = threading.Event()
    ran: list[str] = []
    blocking = thread.submit(lambda: gate.wait(5))
    waiting = thread.submit(lambda: ran.append("cancelled call"))
    waiting.cancel()
    gate.set()
    assert await blocking is True
    assert await thread.submit(lambda: len(ran)) == 0


async def test_a_caller_cancelled_while_its_call_runs_leaves_the_call_to_finish(thread: DatabaseThread) -> None:
    gate = threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        gate.wait(5)
        finished.append(True)

    caller = asyncio.ensure_future(thread.submit(slow))
    await asyncio.sleep(0.01)
    caller.cancel()
    gate.set()
    assert await thread.submit(lambda: finished) == [True]


async def test_close_runs_what_was_sent_first_and_refuses_later_calls(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "alex.db")
    await db.run(lambda c: c.execute("CREATE TABLE t (n INTEGER)"))

    def insert(connection: sqlite3.Connection, number: int) -> None:
        connection.execute("INSERT INTO t VALUES (?)", (number,))

    writes = [asyncio.ensure_future(db.run(insert, n)) for n in range(20)]
    await asyncio.sleep(0)  # every write is sent
    await db.close()
    assert all(w.done() and w.exception() is None for w in writes)
    assert db.closed
    with pytest.raises(RuntimeError, match="closed"):
        await db.run(lambda c: None)
    await db.close()
    check = sqlite3.connect(tmp_path / "alex.db")
    assert check.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 20
    check.close()


async def test_a_database_that_cannot_open_raises_and_leaves_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(sqlite3.OperationalError):
        await SqliteDatabase.open(tmp_path / "folder.db")
    assert threading.active_count() == before


async def test_the_memory_database_works_through_the_thread() -> None:
    db = await SqliteDatabase.open(MEMORY)
    try:
        assert await db.run(lambda c: c.execute("SELECT 1 + 1").fetchone()[0]) == 2
    finally:
        await db.close()


async def test_the_calls_of_one_turn_of_the_loop_are_answered_together(thread: DatabaseThread) -> None:
    calls = [thread.submit(functools.partial(int, n)) for n in range(10)]
    assert await calls[0] == 0
    assert all(call.done() for call in calls)  # settled by the same callback as the first
    assert [call.result() for call in calls] == list(range(10))


async def test_a_database_is_used_from_the_loop_that_opened_it(tmp_path: Path) -> None:
    db = await SqliteDatabase.open(tmp_path / "alex.db")
    try:
        def elsewhere() -> None:
            asyncio.run(db.run(lambda c: None))

        with pytest.raises(RuntimeError, match="another event loop"):
            await asyncio.to_thread(elsewhere)
    finally:
        await db.close()
