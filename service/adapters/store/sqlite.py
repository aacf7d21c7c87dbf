"""The SQLite database the SQLite adapters share: one connection, one worker thread, the schema and its version.

SQLite calls block, so none of them runs on the event loop: :meth:`SqliteDatabase.run` sends a function to the one
thread that owns the connection. One thread means the calls run one after the other in the order they were sent,
which the adapters rely on (a write sent before a read is visible to that read) and which makes a single
connection safe without locks.

The hand-off goes in batches, not through ``run_in_executor``: a task makes several store calls and the statements
take microseconds, so a ``concurrent.futures`` future, its chaining to an asyncio future, and a wake-up of the thread
and then of the loop for every call cost more than the SQL (the server usually runs on one core, where each wake-up
is a switch of threads). The calls of one turn of the event loop go to the thread together, and their answers come
back together (see :class:`DatabaseThread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from service.domain.events import utc_parts

P = ParamSpec("P")
T = TypeVar("T")

MEMORY = ":memory:"
"""Pass as the path for a private in-memory database (tests)."""

_MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: the first schema.
    """
    CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        owner       TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        updated_at  TEXT NOT NULL,
        messages    TEXT NOT NULL DEFAULT '[]',
        todos       TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX sessions_by_owner ON sessions (owner, created_at);

    -- No foreign key to sessions: a task is deleted with its session explicitly, in the same transaction, which
    -- keeps this backend's behaviour the same as the in-memory and Redis ones.
    CREATE TABLE tasks (
        id            TEXT PRIMARY KEY,
        session_id    TEXT NOT NULL,
        owner         TEXT NOT NULL,
        text          TEXT NOT NULL,
        status        TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        started_at    TEXT,
        finished_at   TEXT,
        final_answer  TEXT,
        iterations    INTEGER NOT NULL DEFAULT 0,
        usage         TEXT NOT NULL DEFAULT '{}',
        error         TEXT,
        trace_id      TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX tasks_by_session ON tasks (session_id, created_at);
    CREATE INDEX tasks_by_status ON tasks (status);

    -- Ids are given by the event log (one sequence for the database), not by SQLite.
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL,
        task_id     TEXT NOT NULL,
        event_type  TEXT NOT NULL,
        data        TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE INDEX events_by_session ON events (session_id, id);

    -- Small facts the adapters keep between runs (the event id high-water mark, a clean-shutdown flag).
    CREATE TABLE meta (
        key    TEXT PRIMARY KEY,
        value
    );
    """,
)
"""``_MIGRATIONS[n]`` takes the schema from version ``n`` to ``n + 1``; append, never edit."""

SCHEMA_VERSION = len(_MIGRATIONS)


_Call = tuple[Callable[[], Any], "asyncio.Future[Any]"]
_Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


class DatabaseThread:
    """The one thread that runs a connection's calls, in the order they were sent, for one event loop.

    :meth:`submit` returns a future of the loop. The calls submitted during one turn of the loop go to the thread
    together, at the end of that turn; the thread runs every call waiting and settles their futures with one
    callback. A turn of the loop thus wakes the thread at most once, and the thread wakes the loop once per batch,
    however many tasks called the store meanwhile. A call whose future was cancelled before the thread reached it
    is skipped; one already running finishes (its answer is dropped).
    """

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[_Call] = []
        self._batches: queue.SimpleQueue[list[_Call] | None] = queue.SimpleQueue()
        # A daemon: a database somebody forgot to close must not keep the interpreter from exiting.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("the database is used from another event loop than the one that opened it")
        future: asyncio.Future[T] = self._loop.create_future()
        pending = self._pending
        pending.append((call, future))
        if len(pending) == 1:
            self._loop.call_soon(self._hand_over)
        return future

    def _hand_over(self) -> None:
        batch, self._pending = self._pending, []
        self._batches.put(batch)

    def stop(self) -> None:
        """Let the thread run what was sent, then end it; waits for it."""
        if self._pending:
            self._hand_over()
        self._batches.put(None)
        self._thread.join()

    def _serve(self) -> None:
        batches = self._batches
        while True:
            batch = batches.get()
            answers: list[_Answer] = []
            while batch is not None:
                for call, future in batch:
                    if future.cancelled():
                        continue
                    try:
                        answers.append((future, call(), None))
                    except BaseException as exc:  # handed to the caller, as an executor would
                        answers.append((future, None, exc))
                try:
                    batch = batches.get_nowait()
                except queue.Empty:
                    break
            if answers:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                    self._loop.call_soon_threadsafe(_settle, answers)
            if batch is None:
                return


def _settle(answers: list[_Answer]) -> None:
    for future, result, error in answers:
        if future.cancelled():
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


class SqliteDatabase:
    """One SQLite connection, used only from its own thread (:class:`DatabaseThread`); open with :meth:`open`.

    The database runs in WAL mode with ``synchronous=NORMAL``: readers never block the writer, and a commit is
    durable against a process crash (a power loss may take the last commits back, never corrupt the file).
    Connections run in autocommit mode; write several statements atomically with :func:`transaction`.
    """

    def __init__(self, connection: sqlite3.Connection, thread: DatabaseThread) -> None:
        """Use :meth:`open`."""
        self._connection: sqlite3.Connection | None = connection
        self._thread = thread

    @classmethod
    async def open(cls, path: Path | str, *, busy_timeout_ms: int = 5000) -> SqliteDatabase:
        """Open (creating it and its folder when missing) the database at ``path``, and bring its schema up to date.

        ``path`` may be :data:`MEMORY`. Raises ``RuntimeError`` for a database written by a newer version.
        """
        thread = DatabaseThread("sqlite", asyncio.get_running_loop())
        try:
            connection = await thread.submit(functools.partial(_connect, str(path), busy_timeout_ms))
        except BaseException:
            thread.stop()
            raise
        return cls(connection, thread)

    async def run(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args,
                  **kwargs: P.kwargs) -> T:
        """Run ``fn(connection, *args, **kwargs)`` on the database thread and return its result.

        Calls run one at a time, in the order ``run`` was called. Cancelling the caller does not stop a call
        already started on the thread.
        """
        connection = self._connection
        if connection is None:
            raise RuntimeError("the database is closed")
        return await self._thread.submit(functools.partial(fn, connection, *args, **kwargs))

    @property
    def closed(self) -> bool:
        return self._connection is None

    async def close(self) -> None:
        """Close the connection on its thread, after every call already sent, then stop the thread. Idempotent."""
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        try:
            await self._thread.submit(connection.close)
        finally:
            # The queue is empty by now (the close ran last), so this only joins an idle thread.
            self._thread.stop()


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed when the block ends, rolled back when it raises.

    ``BEGIN IMMEDIATE`` takes the write lock at the start, so a transaction never fails half-way for want of it.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
        connection.execute("COMMIT")
    except BaseException:
        # Also after a failed COMMIT: a transaction left open would make every later BEGIN fail.
        _rollback(connection)
        raise


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # the first error is the one worth raising
            connection.execute("ROLLBACK")


def to_db_time(moment: datetime) -> str:
    """A fixed-width ISO 8601 UTC string (microseconds kept), which sorts in time order; naive means UTC."""
    second, micro = utc_parts(moment)  # one call per stored event: see utc_parts
    return f"{second}.{micro:06d}+00:00"


def from_db_time(text: str) -> datetime:
    """The aware UTC datetime :func:`to_db_time` stored."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    if path != MEMORY:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: autocommit, so transactions are exactly the ones `transaction` opens.
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")
        _migrate(connection)
    except BaseException:
        connection.close()
        raise
    return connection


def _migrate(connection: sqlite3.Connection) -> None:
    version = int(connection.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"the database has schema version {version}; this server knows up to {SCHEMA_VERSION}")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        # One script per step, inside its own transaction (executescript would not open one), so a failed step
        # leaves the previous version intact.
        script = f"BEGIN IMMEDIATE;\n{_MIGRATIONS[target - 1]}\nPRAGMA user_version = {target};\nCOMMIT;"
        try:
            connection.executescript(script)
        except BaseException:
            _rollback(connection)
            raise
