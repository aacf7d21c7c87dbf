"""The event log in SQLite, with live delivery through the in-process broker and write-behind persistence.

An append never waits for the disk: it takes the next id, encodes the event once, hands it to the broker and
queues its row. One background task, the flusher, writes whatever is queued in one transaction per batch; while a
batch is being written the next appends queue up for the following one (group commit). A transaction starts at
most every :data:`GROUP_COMMIT_SECONDS`: woken from idle, or done with a batch sooner than that, the flusher lets
the rest of that time pass first, so that events arriving one per turn of the loop share a transaction instead of
each taking one (a transaction costs per page it touches, and each session's rows touch their own pages of the
session index). A reader waiting for rows (``read_after``, ``flush``, ``delete_session``, ``close``) cuts that wait
short. Readers wait only for the queued rows of their own session, so a ``read_after`` that starts after an
``append`` returned always sees that event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import Iterable
from itertools import chain
from typing import Any

import structlog

from service.adapters.broker.memory import BufferedSubscription, MemoryBroker
from service.adapters.jsoncodec import dumps
from service.adapters.store.sqlite import SqliteDatabase, transaction
from service.domain.errors import Unavailable
from service.domain.events import Event, StoredEvent, format_timestamp

_log = structlog.get_logger(__name__)

MAX_WRITE_ATTEMPTS = 5
"""A batch that fails this many times in a row is given up (and logged as lost): a log that can never write must
still let the server drain and stop, and must not hold every later event in memory."""

RETRY_DELAY_SECONDS = 0.1
"""The wait before the first retry; it doubles with each failure (0.1 + 0.2 + 0.4 + 0.8 s before giving up)."""

GROUP_COMMIT_SECONDS = 0.02
"""The shortest time from the start of one transaction to the start of the next, in which appends gather. Live
delivery does not wait for it, nor does a reader that waits for rows (it cuts the gathering short). What it costs:
an unclean stop (a killed process) loses the events of the last window, which clients may have seen live (ids
then jump by :data:`CRASH_ID_GAP`, so none is given twice). What it saves, measured in ``loadtests/HISTORY.md``:
against a write per wake-up from idle, +8 % tasks/s and half the service's own time per iteration; from 5 ms to
20 ms, 3-4 us of CPU per event at 7,000-19,000 events/s over 100 sessions (a sixth of what appending an event
costs): each session's rows dirty their own page of the session index, so the cost of a transaction grows with
the sessions it touches more than with its rows."""

CRASH_ID_GAP = 1_000_000
"""How far ids jump after an unclean stop. Ids handed out live but lost with the unwritten queue must never be given
again: a client that saw such an id would resume after it and miss the new events that reused it."""

_HIGH_WATER = "event_id_high_water"
_CLEAN = "event_log_clean_shutdown"

_Row = tuple[int, str, str, str, str, str]
"""id, session_id, task_id, event_type, data, created_at: the columns of ``events``, in order. ``created_at`` is
the event's own ``timestamp`` as its JSON has it (RFC 3339 with milliseconds, ``...T10:00:00.123Z``): formatted
once for both. Nothing reads it back; it is there for whoever looks at the table."""

# OR IGNORE: a batch retried after a write whose outcome was unknown (a cancelled flusher) must not fail on
# its own rows; ids come from one sequence, so an existing id is always that same row.
_INSERT_INTO = "INSERT OR IGNORE INTO events (id, session_id, task_id, event_type, data, created_at) VALUES "

ROWS_PER_INSERT = (64, 16, 4, 1)
"""The sizes of the multi-row ``INSERT`` statements a batch is cut into, largest first. Each statement is one step
of SQLite, for which the database thread gives the GIL up and must take it back from the busy event loop:
``executemany`` takes one step per row. A few fixed sizes keep the statements in the connection's cache."""

_SET_META = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
_TRIM = """
DELETE FROM events WHERE session_id = ?1 AND id <= (
    SELECT id FROM events WHERE session_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2
)"""


SESSION_DELETED = "session_deleted"


class SqliteEventLog:
    """``EventLog`` on a :class:`SqliteDatabase` and a :class:`MemoryBroker`; open with :meth:`open`.

    - Ids come from one sequence for the whole database, so they increase within each session and across them.
      They continue above every id ever given, including those of deleted sessions.
    - ``retention``: a session keeps its newest ``retention`` events. Older ones are trimmed by the flusher once a
      session has had more than a tenth of ``retention`` new events, so up to ``retention + max(1, retention //
      10)`` may be stored between trims.
    - A batch that fails to write is logged and retried with the next one, up to :data:`MAX_WRITE_ATTEMPTS`;
      then its events are logged as lost. A ``read_after`` that waited on a failed batch raises ``Unavailable``
      rather than return a stream with a hole in it.
    - ``close`` writes what is queued and stops the flusher; it does not close the database, which the session
      store shares (whoever opened the database closes it, after both).
    """

    def __init__(self, db: SqliteDatabase, broker: MemoryBroker, retention: int, next_id: int) -> None:
        """Use :meth:`open`."""
        if retention < 1:
            raise ValueError("retention must be at least 1")
        self._db = db
        self._broker = broker
        self._retention = retention
        self._trim_every = max(1, retention // 10)
        self._next_id = next_id
        self._queued: list[_Row] = []
        self._retry: list[_Row] = []
        """Rows of a failed batch, written first with the next one."""
        self._inflight: list[_Row] = []
        self._settled_id = next_id - 1
        """Every id up to this one is written, deleted or given up: readers wait for it to pass their rows."""
        self._since_trim: dict[str, int] = {}
        self._trim_due: set[str] = set()
        self._deletes: dict[str, int] = {}
        """Session -> cut id: its events below the cut go with the next batch (rows appended later stay)."""
        self._delete_waiters: list[asyncio.Future[None]] = []
        self._lost_batches = 0
        self._last_error: BaseException | None = None
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        """Set by a reader that waits for rows: the flusher stops gathering and writes."""
        self._progress = asyncio.Event()
        self._closing = False
        self._flusher = asyncio.create_task(self._run_flusher(), name="sqlite-event-log-flusher")

    @classmethod
    async def open(cls, db: SqliteDatabase, broker: MemoryBroker, retention: int) -> SqliteEventLog:
        """Read where the id sequence stands and start the flusher."""
        next_id = await db.run(_start, CRASH_ID_GAP)
        return cls(db, broker, retention, next_id)

    @property
    def queued(self) -> int:
        """Events appended but not yet written (a gauge for the operators)."""
        return len(self._queued) + len(self._retry) + len(self._inflight)

    async def append(self, event: Event) -> StoredEvent:
        """Give ``event`` the next id, deliver it live at once, and queue it for the flusher; no disk wait."""
        if self._closing:
            raise RuntimeError("the event log is closed")
        event_id = self._next_id
        self._next_id = event_id + 1
        stored = StoredEvent.encode(event_id, event, dumps)
        session_id = event.session_id
        self._queued.append((event_id, session_id, event.task_id, event.event_type, stored.data,
                             format_timestamp(event.timestamp)))
        count = self._since_trim.get(session_id, 0) + 1
        if count > self._trim_every:
            self._since_trim.pop(session_id, None)
            self._trim_due.add(session_id)
        else:
            self._since_trim[session_id] = count
        self._wake.set()
        if self._flusher.done():
            self._restart_flusher()
        self._broker.publish(stored)
        return stored

    async def read_after(self, session_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        if limit <= 0:
            return []
        await self._wait_written(session_id)
        rows = await self._db.run(_select_after, session_id, after_id, limit)
        return [StoredEvent.from_json(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    def subscribe(self, session_id: str, buffer_size: int) -> BufferedSubscription:
        return self._broker.subscribe(session_id, buffer_size)

    async def delete_session(self, session_id: str) -> None:
        """Delete the session's events, those written and those still queued, and end its subscriptions; later
        appends to it stay."""
        # Queued rows need not be written at all; rows in flight (or waiting for a retry) are removed by the cut,
        # in the same transaction as the next batch, so a failed batch cannot bring them back.
        self._queued = [row for row in self._queued if row[1] != session_id]
        self._retry = [row for row in self._retry if row[1] != session_id]
        self._since_trim.pop(session_id, None)
        self._trim_due.discard(session_id)
        self._deletes[session_id] = self._next_id
        done = asyncio.get_running_loop().create_future()
        self._delete_waiters.append(done)
        self._write_now()
        await done
        self._broker.close_session(session_id, SESSION_DELETED)

    def close_subscriptions(self, reason: str) -> None:
        self._broker.close_all(reason)

    async def flush(self) -> None:
        """Wait until every event appended so far is written (or given up)."""
        await self._wait_until(self._next_id - 1)

    async def close(self) -> None:
        """Write what is queued, stop the flusher, close the remaining subscriptions. Idempotent."""
        if self._closing:
            await asyncio.wait([self._flusher])
            return
        self._closing = True
        self._wake.set()
        self._hurry.set()
        if self._flusher.done() and (self.queued or self._deletes):
            self._restart_flusher()
        # wait() neither raises the flusher's outcome nor cancels it when this caller is cancelled.
        await asyncio.wait([self._flusher])
        self._broker.close_all("closed")
        try:
            await self._db.run(_finish, self._next_id - 1)
        except Exception as exc:  # a failing disk must not stop the shutdown; the next start skips ids instead
            _log.error("event_log_close_failed", error=repr(exc))

    async def _wait_written(self, session_id: str) -> None:
        target = max((row[0] for row in chain(self._inflight, self._retry, self._queued) if row[1] == session_id),
                     default=0)
        await self._wait_until(target)

    async def _wait_until(self, target: int) -> None:
        lost = self._lost_batches
        while self._settled_id < target and self._has_work():
            progress = self._progress
            self._write_now()
            await progress.wait()
        if self._lost_batches != lost:
            raise Unavailable("the event store could not write; events may be missing") from self._last_error

    def _has_work(self) -> bool:
        return bool(self._queued or self._retry or self._inflight or self._trim_due or self._deletes)

    def _write_now(self) -> None:
        """Someone waits for rows: wake the flusher, cut its gathering short, restart it if it was cancelled."""
        self._wake.set()
        self._hurry.set()
        if self._flusher.done():
            self._restart_flusher()

    def _restart_flusher(self) -> None:
        # The flusher catches every error of a write, so this only happens when it was cancelled from outside.
        _log.warning("event_log_flusher_restarted")
        self._flusher = asyncio.create_task(self._run_flusher(), name="sqlite-event-log-flusher")

    async def _gather(self, seconds: float) -> None:
        """Let appends queue up for ``seconds``, or until a reader waits for rows (never once closing)."""
        if seconds <= 0 or self._closing or self._hurry.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._hurry.wait()

    async def _run_flusher(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self._has_work():
                if self._closing:
                    return
                await self._wake.wait()
                await self._gather(GROUP_COMMIT_SECONDS)
                continue
            started = loop.time()
            # A reader that asks from now on waits for rows this batch may not hold.
            self._hurry.clear()
            # Every id up to here is in this batch, in an earlier one, or was deleted before being written.
            batch_top = self._next_id - 1
            batch = self._retry + self._queued if self._retry else self._queued
            self._retry, self._queued, self._inflight = [], [], batch
            trims, self._trim_due = self._trim_due, set()
            deletes, self._deletes = self._deletes, {}
            waiters, self._delete_waiters = self._delete_waiters, []
            try:
                await self._db.run(_write_batch, batch, deletes, trims, self._retention)
            except asyncio.CancelledError:
                # Cancelled from outside (the loop is going away): keep the work for a restarted flusher.
                self._requeue(batch, trims, deletes, waiters)
                raise
            except Exception as exc:
                failures += 1
                self._last_error = exc
                if failures < MAX_WRITE_ATTEMPTS:
                    _log.warning("event_batch_write_failed", attempt=failures, events=len(batch), error=repr(exc))
                    self._requeue(batch, trims, deletes, waiters)
                    self._signal_progress()
                    await asyncio.sleep(RETRY_DELAY_SECONDS * 2 ** (failures - 1))
                    continue
                failures = 0
                self._lost_batches += 1
                _log.error("event_batch_lost", events=len(batch), first_id=batch[0][0] if batch else None,
                           last_id=batch[-1][0] if batch else None, error=repr(exc))
                _settle(waiters, exc)
            else:
                failures = 0
                self._last_error = None
                _settle(waiters, None)
            self._inflight = []
            self._settled_id = batch_top
            self._signal_progress()
            if self._has_work():
                await self._gather(started + GROUP_COMMIT_SECONDS - loop.time())

    def _requeue(self, batch: list[_Row], trims: set[str], deletes: dict[str, int],
                 waiters: list[asyncio.Future[None]]) -> None:
        """Put a batch that was not written back in front of the queue, with its trims and deletes."""
        self._inflight = []
        self._retry = batch
        self._trim_due |= trims
        for session_id, cut in deletes.items():
            self._deletes[session_id] = max(cut, self._deletes.get(session_id, 0))
        self._delete_waiters = waiters + self._delete_waiters

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()


def _settle(waiters: Iterable[asyncio.Future[None]], error: BaseException | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(Unavailable("the event store could not delete the session's events"))


def _start(connection: sqlite3.Connection, crash_gap: int) -> int:
    """The next id, and mark the log open: if it is not marked clean again at close, the next start skips ids."""
    with transaction(connection):
        top = connection.execute("SELECT MAX(id) FROM events").fetchone()[0] or 0
        meta = dict(connection.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", (_HIGH_WATER, _CLEAN)))
        top = max(int(top), int(meta.get(_HIGH_WATER) or 0))
        # A database never opened by the log (no meta yet) counts as clean.
        if int(meta.get(_CLEAN, 1)) == 0:
            _log.warning("event_log_unclean_shutdown", skipped_ids=crash_gap)
            top += crash_gap
        connection.execute(_SET_META, (_HIGH_WATER, top))
        connection.execute(_SET_META, (_CLEAN, 0))
    return int(top) + 1


def _finish(connection: sqlite3.Connection, last_id: int) -> None:
    with transaction(connection):
        connection.execute(
            "UPDATE meta SET value = MAX(value, ?) WHERE key = ?", (last_id, _HIGH_WATER))
        connection.execute(_SET_META, (_CLEAN, 1))


def _write_batch(connection: sqlite3.Connection, rows: list[_Row], deletes: dict[str, int], trims: set[str],
                 retention: int) -> None:
    with transaction(connection):
        _insert(connection, rows)
        for session_id, cut in deletes.items():
            connection.execute("DELETE FROM events WHERE session_id = ? AND id < ?", (session_id, cut))
        for session_id in trims:
            connection.execute(_TRIM, (session_id, retention))
        if rows:
            connection.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = ?", (rows[-1][0], _HIGH_WATER))


def _select_after(connection: sqlite3.Connection, session_id: str, after_id: int, limit: int) -> list[Any]:
    return connection.execute(
        "SELECT id, session_id, task_id, event_type, data FROM events WHERE session_id = ? AND id > ? "
        "ORDER BY id LIMIT ?", (session_id, after_id, limit)).fetchall()


@functools.cache
def _insert_rows(count: int) -> str:
    return _INSERT_INTO + ", ".join(["(?, ?, ?, ?, ?, ?)"] * count)


def _insert(connection: sqlite3.Connection, rows: list[_Row]) -> None:
    """Insert ``rows`` with as few statements as :data:`ROWS_PER_INSERT` allows."""
    start, total = 0, len(rows)
    for size in ROWS_PER_INSERT:
        sql = _insert_rows(size)
        while total - start >= size:
            connection.execute(sql, [value for row in rows[start:start + size] for value in row])
            start += size
