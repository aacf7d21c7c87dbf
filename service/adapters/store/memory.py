"""The event log and the session store in memory: the fakes of the use cases' unit tests, and a store for demos.

They keep the contracts of the SQLite adapters (the same contract suite runs on both): ids from one sequence,
the same retention, copies in and out so a caller's later changes never reach what is stored. Nothing survives the
process.
"""

from __future__ import annotations

import copy
from bisect import bisect_right
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service.adapters.broker.memory import BufferedSubscription, MemoryBroker
from service.adapters.jsoncodec import dumps
from service.domain.events import Event, StoredEvent, utc_now
from service.domain.models import Session, Task, TaskStatus, Todo

_UNFINISHED = (TaskStatus.QUEUED, TaskStatus.RUNNING)


class MemoryEventLog:
    """``EventLog`` in memory, delivering live through a :class:`MemoryBroker`.

    ``retention`` as in the SQLite log: a session keeps its newest ``retention`` events, trimmed once it has had
    more than a tenth of ``retention`` new ones, so up to ``retention + max(1, retention // 10)`` are kept.
    """

    def __init__(self, broker: MemoryBroker, retention: int = 10_000, *, first_id: int = 1) -> None:
        if retention < 1:
            raise ValueError("retention must be at least 1")
        self._broker = broker
        self._retention = retention
        self._trim_every = max(1, retention // 10)
        self._next_id = first_id
        self._events: dict[str, list[StoredEvent]] = {}
        self._since_trim: dict[str, int] = {}
        self._closed = False

    async def append(self, event: Event) -> StoredEvent:
        if self._closed:
            raise RuntimeError("the event log is closed")
        stored = StoredEvent.encode(self._next_id, event, dumps)
        self._next_id += 1
        events = self._events.setdefault(event.session_id, [])
        events.append(stored)
        count = self._since_trim.get(event.session_id, 0) + 1
        if count > self._trim_every:
            del events[:-self._retention]
            count = 0
        self._since_trim[event.session_id] = count
        self._broker.publish(stored)
        return stored

    async def read_after(self, session_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        events = self._events.get(session_id)
        if not events or limit <= 0:
            return []
        start = bisect_right(events, after_id, key=lambda stored: stored.id)
        return events[start:start + limit]

    def subscribe(self, session_id: str, buffer_size: int) -> BufferedSubscription:
        return self._broker.subscribe(session_id, buffer_size)

    async def delete_session(self, session_id: str) -> None:
        self._events.pop(session_id, None)
        self._since_trim.pop(session_id, None)
        self._broker.close_session(session_id, "session_deleted")

    def close_subscriptions(self, reason: str) -> None:
        self._broker.close_all(reason)

    async def close(self) -> None:
        self._closed = True
        self._broker.close_all("closed")


class MemorySessionStore:
    """``SessionStore`` in memory, with the SQLite store's rules (see :class:`SqliteSessionStore`)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._tasks: dict[str, Task] = {}

    async def create_session(self, session: Session) -> Session:
        if session.id not in self._sessions:
            stored = copy.deepcopy(session)
            stored.created_at, stored.updated_at = _utc(stored.created_at), _utc(stored.updated_at)
            self._sessions[session.id] = stored
        return copy.deepcopy(self._sessions[session.id])

    async def get_session(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        return None if session is None else copy.deepcopy(session)

    async def list_sessions(self, owner: str | None) -> list[str]:
        # Dicts keep insertion order; sorting (stable) by creation time gives "oldest first" like the SQL.
        sessions = sorted(self._sessions.values(), key=lambda session: session.created_at)
        return [session.id for session in sessions if owner is None or session.owner == owner]

    async def save_messages(self, session_id: str, messages: Sequence[dict[str, Any]]) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.messages = copy.deepcopy(list(messages))
            session.updated_at = utc_now()

    async def get_todos(self, session_id: str) -> list[Todo]:
        session = self._sessions.get(session_id)
        return [] if session is None else list(session.todos)

    async def set_todos(self, session_id: str, todos: Sequence[Todo]) -> None:
        session = self._sessions.get(session_id)
        if session is not None:
            session.todos = list(todos)  # Todo is frozen: sharing the records is safe
            session.updated_at = utc_now()

    async def delete_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        for task_id in [task.id for task in self._tasks.values() if task.session_id == session_id]:
            del self._tasks[task_id]

    async def create_task(self, task: Task) -> None:
        if task.id in self._tasks:
            raise ValueError(f"task {task.id} exists already")
        self._tasks[task.id] = _stored_task(task)

    async def get_task(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        return None if task is None else copy.deepcopy(task)

    async def update_task(self, task: Task) -> None:
        stored = self._tasks.get(task.id)
        if stored is not None:
            # Where the task belongs never changes, as in the SQL store.
            updated = _stored_task(task)
            updated.session_id, updated.owner = stored.session_id, stored.owner
            self._tasks[task.id] = updated

    async def find_tasks(self, session_id: str, statuses: Sequence[TaskStatus]) -> list[Task]:
        wanted = set(statuses)
        found = [task for task in self._tasks.values() if task.session_id == session_id and task.status in wanted]
        found.sort(key=lambda task: task.created_at)
        return [copy.deepcopy(task) for task in found]

    async def interrupt_unfinished_tasks(self, reason: str) -> list[Task]:
        now = utc_now()
        interrupted = []
        for task in sorted(self._tasks.values(), key=lambda task: task.created_at):
            if task.status in _UNFINISHED:
                task.status = TaskStatus.INTERRUPTED
                task.error = reason
                task.finished_at = now
                interrupted.append(copy.deepcopy(task))
        return interrupted

    async def ping(self) -> None:
        """Always answers."""

    async def close(self) -> None:
        """Nothing to release."""


def _utc(moment: datetime) -> datetime:
    """Times come back in UTC from every store (naive means UTC), as from the SQL one."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _stored_task(task: Task) -> Task:
    stored = copy.deepcopy(task)
    stored.created_at = _utc(stored.created_at)
    stored.started_at = None if stored.started_at is None else _utc(stored.started_at)
    stored.finished_at = None if stored.finished_at is None else _utc(stored.finished_at)
    return stored
