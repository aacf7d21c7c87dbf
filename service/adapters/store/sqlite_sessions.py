"""Sessions and tasks in SQLite.

Times are stored as fixed-width ISO 8601 UTC text (:func:`to_db_time`): exact to the microsecond, readable in the
``sqlite3`` shell, and in time order when sorted as text. Messages, todos and usage are JSON text.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from service.adapters.jsoncodec import dumps_text
from service.adapters.store.sqlite import SqliteDatabase, from_db_time, to_db_time, transaction
from service.domain.events import utc_now
from service.domain.models import Session, Task, TaskStatus, Todo

UNFINISHED = (TaskStatus.QUEUED, TaskStatus.RUNNING)

_TASK_COLUMNS = ("id, session_id, owner, text, status, created_at, started_at, finished_at, final_answer, "
                 "iterations, usage, error, trace_id")


class SqliteSessionStore:
    """``SessionStore`` on a :class:`SqliteDatabase` shared with the event log.

    Writes to a session that does not exist (``save_messages``, ``set_todos``) and updates of a task that does
    not exist do nothing: the session may have been deleted while its task was finishing. ``create_task`` with an
    id already taken raises ``ValueError``. ``find_tasks`` returns the session's tasks whose status is one of
    ``statuses`` (none for an empty sequence), oldest first. ``close`` releases nothing: whoever opened the
    database closes it.
    """

    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def create_session(self, session: Session) -> Session:
        return await self._db.run(_create_session, session)

    async def get_session(self, session_id: str) -> Session | None:
        return await self._db.run(_get_session, session_id)

    async def list_sessions(self, owner: str | None) -> list[str]:
        return await self._db.run(_list_sessions, owner)

    async def save_messages(self, session_id: str, messages: Sequence[dict[str, Any]]) -> None:
        await self._db.run(_update_session, session_id, "messages", dumps_text(list(messages)))

    async def get_todos(self, session_id: str) -> list[Todo]:
        return await self._db.run(_get_todos, session_id)

    async def set_todos(self, session_id: str, todos: Sequence[Todo]) -> None:
        await self._db.run(_update_session, session_id, "todos", dumps_text([todo.to_dict() for todo in todos]))

    async def delete_session(self, session_id: str) -> None:
        await self._db.run(_delete_session, session_id)

    async def create_task(self, task: Task) -> None:
        await self._db.run(_create_task, task)

    async def get_task(self, task_id: str) -> Task | None:
        return await self._db.run(_get_task, task_id)

    async def update_task(self, task: Task) -> None:
        await self._db.run(_update_task, task)

    async def find_tasks(self, session_id: str, statuses: Sequence[TaskStatus]) -> list[Task]:
        if not statuses:
            return []
        return await self._db.run(_find_tasks, session_id, [TaskStatus(status).value for status in statuses])

    async def interrupt_unfinished_tasks(self, reason: str) -> list[Task]:
        return await self._db.run(_interrupt_unfinished, reason)

    async def ping(self) -> None:
        await self._db.run(_ping)

    async def close(self) -> None:
        """Nothing of its own to release (see the class docstring)."""


def _ping(connection: sqlite3.Connection) -> None:
    connection.execute("SELECT 1").fetchone()


def _create_session(connection: sqlite3.Connection, session: Session) -> Session:
    # A session that exists is returned as it is, without taking the write lock: most calls claim an id their
    # caller already holds (a task submitted on the session its stream opened).
    existing = _get_session(connection, session.id)
    if existing is not None:
        return existing
    # Both statements in one transaction on the one connection: no other writer can slip between them, and the
    # session returned is the one that holds the id, whoever created it.
    with transaction(connection):
        connection.execute(
            "INSERT OR IGNORE INTO sessions (id, owner, created_at, updated_at, messages, todos) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (session.id, session.owner, to_db_time(session.created_at), to_db_time(session.updated_at),
             dumps_text(session.messages), dumps_text([todo.to_dict() for todo in session.todos])))
        stored = _get_session(connection, session.id)
    if stored is None:  # pragma: no cover - the row was just written in the same transaction
        raise RuntimeError(f"session {session.id} vanished")
    return stored


def _get_session(connection: sqlite3.Connection, session_id: str) -> Session | None:
    row = connection.execute(
        "SELECT id, owner, created_at, updated_at, messages, todos FROM sessions WHERE id = ?",
        (session_id,)).fetchone()
    if row is None:
        return None
    return Session(
        id=row["id"],
        owner=row["owner"],
        created_at=from_db_time(row["created_at"]),
        updated_at=from_db_time(row["updated_at"]),
        messages=json.loads(row["messages"]),
        todos=[Todo.from_dict(todo) for todo in json.loads(row["todos"])],
    )


def _list_sessions(connection: sqlite3.Connection, owner: str | None) -> list[str]:
    if owner is None:
        rows = connection.execute("SELECT id FROM sessions ORDER BY created_at, rowid").fetchall()
    else:
        rows = connection.execute(
            "SELECT id FROM sessions WHERE owner = ? ORDER BY created_at, rowid", (owner,)).fetchall()
    return [str(row[0]) for row in rows]


def _get_todos(connection: sqlite3.Connection, session_id: str) -> list[Todo]:
    row = connection.execute("SELECT todos FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        return []
    return [Todo.from_dict(todo) for todo in json.loads(row[0])]


def _update_session(connection: sqlite3.Connection, session_id: str, column: str, value: str) -> None:
    # The column name comes from this module only (never from input), hence the one composed statement.
    if column not in ("messages", "todos"):
        raise ValueError(column)
    connection.execute(
        f"UPDATE sessions SET {column} = ?, updated_at = ? WHERE id = ?",  # noqa: S608
        (value, to_db_time(utc_now()), session_id))


def _delete_session(connection: sqlite3.Connection, session_id: str) -> None:
    with transaction(connection):
        connection.execute("DELETE FROM tasks WHERE session_id = ?", (session_id,))
        connection.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


def _task_values(task: Task) -> tuple[Any, ...]:
    return (
        task.id, task.session_id, task.owner, task.text, TaskStatus(task.status).value, to_db_time(task.created_at),
        None if task.started_at is None else to_db_time(task.started_at),
        None if task.finished_at is None else to_db_time(task.finished_at),
        task.final_answer, task.iterations, dumps_text(task.usage), task.error, task.trace_id,
    )


def _task_from_row(row: sqlite3.Row) -> Task:
    return Task(
        id=row["id"],
        session_id=row["session_id"],
        owner=row["owner"],
        text=row["text"],
        status=TaskStatus(row["status"]),
        created_at=from_db_time(row["created_at"]),
        started_at=None if row["started_at"] is None else from_db_time(row["started_at"]),
        finished_at=None if row["finished_at"] is None else from_db_time(row["finished_at"]),
        final_answer=row["final_answer"],
        iterations=int(row["iterations"]),
        usage={str(key): int(value) for key, value in json.loads(row["usage"]).items()},
        error=row["error"],
        trace_id=row["trace_id"],
    )


def _create_task(connection: sqlite3.Connection, task: Task) -> None:
    try:
        connection.execute(f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES ({', '.join('?' * 13)})",  # noqa: S608
                           _task_values(task))
    except sqlite3.IntegrityError as exc:
        raise ValueError(f"task {task.id} exists already") from exc


def _get_task(connection: sqlite3.Connection, task_id: str) -> Task | None:
    row = connection.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()  # noqa: S608
    return None if row is None else _task_from_row(row)


def _update_task(connection: sqlite3.Connection, task: Task) -> None:
    # Every column but the id and where the task belongs (session, owner), which never change.
    values = _task_values(task)
    connection.execute(
        "UPDATE tasks SET text = ?, status = ?, created_at = ?, started_at = ?, finished_at = ?, final_answer = ?, "
        "iterations = ?, usage = ?, error = ?, trace_id = ? WHERE id = ?",
        (*values[3:], task.id))


def _find_tasks(connection: sqlite3.Connection, session_id: str, statuses: list[str]) -> list[Task]:
    marks = ", ".join("?" * len(statuses))
    rows = connection.execute(
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE session_id = ? AND status IN ({marks}) "  # noqa: S608
        "ORDER BY created_at, rowid", (session_id, *statuses)).fetchall()
    return [_task_from_row(row) for row in rows]


def _interrupt_unfinished(connection: sqlite3.Connection, reason: str) -> list[Task]:
    unfinished = [status.value for status in UNFINISHED]
    with transaction(connection):
        rows = connection.execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status IN (?, ?) ORDER BY created_at, rowid",  # noqa: S608
            unfinished).fetchall()
        tasks = [_task_from_row(row) for row in rows]
        if not tasks:
            return []
        now = utc_now()
        connection.execute(
            "UPDATE tasks SET status = ?, error = ?, finished_at = ? WHERE status IN (?, ?)",
            (TaskStatus.INTERRUPTED.value, reason, to_db_time(now), *unfinished))
    for task in tasks:
        task.status = TaskStatus.INTERRUPTED
        task.error = reason
        task.finished_at = now
    return tasks
