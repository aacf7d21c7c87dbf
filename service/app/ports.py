"""The ports the use cases need from storage and delivery, each a small Protocol.

Adapters: ``service.adapters.store`` (SQLite, and in-memory ones for tests) with ``service.adapters.broker``
(in-process fan-out) for one process; ``service.adapters.redis`` for several replicas.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from service.domain.events import Event, StoredEvent
from service.domain.models import Session, Task, TaskStatus, Todo

STORE_UNAVAILABLE = "store_unavailable"
"""Why a stream ended whose stored events could not be read (``read_after`` raised ``Unavailable``: Redis did not
answer, or SQLite lost a write). Its client resumes from its last id, later or on another replica."""


class Subscription(Protocol):
    """Live events of one session for one reader, through a bounded buffer.

    ``next_batch`` waits until at least one event is pending or the subscription is closed, then returns every
    pending event in id order; it returns an empty list once closed and drained. When ``buffer_size`` events are
    pending and one more arrives, all of them are dropped (counted in ``dropped``), ``close_reason`` becomes
    ``"slow_client"`` and the subscription closes: the reader recovers the rest from the log. After a normal
    ``close`` the events already pending are still returned.
    """

    last_id: int
    """The id of the last event the reader has had. The reader sets it as it reads (a replay, ``next_batch``); an
    event at or below it is never offered (see ``write_through``), and one the offer takes moves it."""

    @property
    def close_reason(self) -> str | None: ...

    @property
    def dropped(self) -> int: ...

    @property
    def pending(self) -> int:
        """Events received and not yet taken by ``next_batch``."""

    @property
    def offered(self) -> int:
        """Events the offer of ``write_through`` took."""

    async def ready(self) -> None:
        """Return once every event appended from now on will reach this subscription (at once in-process; a
        replica of several first learns where the session's shared stream stands). Read the replay after it."""

    async def next_batch(self) -> list[StoredEvent]: ...

    def notify_when_filling(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` each time half of the buffer is pending (None: stop). A reader that takes its events in
        batches on purpose (a stream pacing its writes under load) then goes on early, before it is cut off."""

    def write_through(self, offer: Callable[[bytes], bool] | None,
                      taken: Callable[[StoredEvent, int], None] | None = None) -> None:
        """While the reader waits in ``next_batch`` with nothing pending, hand the SSE frame of each new event above
        ``last_id`` to ``offer`` first (from within the publishing call); True: it took the event, which is then not
        buffered, ``last_id`` becomes its id and ``offered`` counts it. None: stop. Events reach the reader in order
        either way. ``taken(event, count)`` hears once per event how many of the subscriptions that share it took
        the event."""

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


class TaskBoard(Protocol):
    """Who runs which task: the queue every replica takes from, one task at a time per session, a cap on the
    unfinished tasks of each owner, cancel requests, and (with several replicas) leases on running tasks.

    A task goes: ``reserve`` (its session and one of its owner's places; raises ``Conflict`` naming the session's
    task, or ``LimitExceeded``), then, once stored, ``enqueue``; a worker's ``take`` hands it to exactly one
    replica, which holds it until ``release``. ``withdraw`` takes a queued task back before anyone runs it.
    A reservation that is never enqueued (its replica stopped between the two) lapses by itself.
    """

    @property
    def exclusive(self) -> bool:
        """True when this process is the only one using the board: what it finds unfinished at start is its own."""

    def bind(self, on_cancel: Callable[[str, str], None], on_lost: Callable[[str], None],
             on_reaped: Callable[[str], Awaitable[None]]) -> None:
        """The runner's callbacks: a cancel request for a task (id, reason), a held task whose lease was lost
        (another replica declared it interrupted), a task this replica declared interrupted for another."""

    async def start(self) -> None: ...

    async def reserve(self, task: Task, max_per_owner: int) -> None: ...

    async def enqueue(self, task: Task) -> None: ...

    async def take(self, limit: int) -> list[str]:
        """Ids of up to ``limit`` queued tasks now held by this replica; may return ``[]`` after a while."""

    async def withdraw(self, task_id: str) -> bool:
        """Take the task out of the queue if nobody runs it yet; False when it was taken (or is gone)."""

    async def request_cancel(self, task_id: str, reason: str) -> None:
        """Ask the replica that holds the task to stop it."""

    async def release(self, task: Task) -> None:
        """Free the task's session and its owner's place; the replica no longer holds it."""

    async def session_task(self, session_id: str) -> str | None:
        """The id of the session's queued or running task, if any."""

    def stop_taking(self) -> None:
        """Draining: ``take`` returns ``[]`` from now on; queued tasks stay for the other replicas."""

    async def withdraw_all(self) -> list[str]:
        """At shutdown: on a board no other process uses, withdraw every queued task (nobody else would run them)
        and return their ids; on a shared board, nothing (they wait for the other replicas)."""

    async def close(self) -> None: ...


class ClientStreams(Protocol):
    """Open streams per subject, counted against a cap across every replica that shares the counter."""

    async def acquire(self, subject: str, stream_id: str, limit: int) -> None:
        """Count one more stream of ``subject``; ``LimitExceeded`` when it has ``limit`` open already."""

    def release(self, subject: str, stream_id: str) -> None:
        """The stream ended (may complete later, in the background)."""
