"""The ports the use cases need from storage and delivery, each a small Protocol.

Adapters: ``service.adapters.store`` (SQLite) and ``service.adapters.broker`` (in-process fan-out) today; Redis
later. ``tests/unit/fakes.py``-style in-memory versions are the adapters in ``service.adapters.store.memory``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from service.domain.events import Event, StoredEvent
from service.domain.models import Session, Task, TaskStatus, Todo


class Subscription(Protocol):
    """Live events of one session for one reader, through a bounded buffer.

    ``next_batch`` waits until at least one event is pending or the subscription is closed, then returns every
    pending event in id order; it returns an empty list once closed and drained. When ``buffer_size`` events are
    pending and one more arrives, all of them are dropped (counted in ``dropped``), ``close_reason`` becomes
    ``"slow_client"`` and the subscription closes: the reader recovers the rest from the log. After a normal
    ``close`` the events already pending are still returned.
    """

    @property
    def close_reason(self) -> str | None: ...

    @property
    def dropped(self) -> int: ...

    @property
    def pending(self) -> int:
        """Events received and not yet taken by ``next_batch``."""

    async def next_batch(self) -> list[StoredEvent]: ...

    def close(self, reason: str = "closed") -> None: ...


class EventLog(Protocol):
    """Every event of every session, in order, with live delivery to the session's subscribers.

    ``append`` assigns the id (strictly increasing within a session), hands the event to the session's current
    subscribers at once and persists it; a ``read_after`` that starts after ``append`` returned sees the event.
    ``read_after`` returns the stored events of a session with ids above ``after_id``, oldest first, at most
    ``limit``; it raises :class:`~service.domain.errors.Unavailable` rather than return a history with a hole (a
    write that failed for good). ``subscribe`` must be called before the replay read so that nothing falls between
    the two. Retention keeps at least the newest ``retention`` events of a session (up to a tenth more between
    trims).
    """

    async def append(self, event: Event) -> StoredEvent: ...

    async def read_after(self, session_id: str, after_id: int, limit: int) -> list[StoredEvent]: ...

    def subscribe(self, session_id: str, buffer_size: int) -> Subscription: ...

    async def delete_session(self, session_id: str) -> None:
        """Delete the session's events and then close its subscriptions (reason ``session_deleted``)."""

    def close_subscriptions(self, reason: str) -> None:
        """Close every open subscription (server draining): their readers end their streams."""

    async def close(self) -> None:
        """Persist whatever is pending and release what the log owns (a shared database is closed by its opener)."""


class SessionStore(Protocol):
    """Sessions (owner, conversation, todos) and their tasks.

    ``create_session`` returns the session that holds the id afterwards: the new one, or the existing one when the
    id was taken (the caller then checks the owner). ``interrupt_unfinished_tasks`` marks every ``queued`` or
    ``running`` task ``interrupted`` (a crash left them so) and returns them. Writes to a missing session or task
    do nothing; ``create_task`` with an id already stored raises ``ValueError``. Times come back timezone-aware,
    in UTC.
    """

    async def create_session(self, session: Session) -> Session: ...

    async def get_session(self, session_id: str) -> Session | None: ...

    async def list_sessions(self, owner: str | None) -> list[str]:
        """Session ids, oldest first: the owner's, or all of them when ``owner`` is None."""

    async def save_messages(self, session_id: str, messages: Sequence[dict[str, Any]]) -> None: ...

    async def get_todos(self, session_id: str) -> list[Todo]: ...

    async def set_todos(self, session_id: str, todos: Sequence[Todo]) -> None: ...

    async def delete_session(self, session_id: str) -> None:
        """The session and its tasks."""

    async def create_task(self, task: Task) -> None: ...

    async def get_task(self, task_id: str) -> Task | None: ...

    async def update_task(self, task: Task) -> None: ...

    async def find_tasks(self, session_id: str, statuses: Sequence[TaskStatus]) -> list[Task]: ...

    async def interrupt_unfinished_tasks(self, reason: str) -> list[Task]: ...

    async def ping(self) -> None:
        """Raise when the backend does not answer (readiness)."""

    async def close(self) -> None:
        """Release what the store owns (a shared database is closed by its opener)."""
