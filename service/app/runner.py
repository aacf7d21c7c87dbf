"""TaskRunner: takes tasks, runs each detached from any HTTP connection, cancels them, and drains at shutdown.

A task belongs to its session's owner. One task runs per session at a time; a subject runs at most
``max_tasks_per_client`` at once. A task's life: ``queued`` → ``running`` → ``completed`` | ``failed`` |
``cancelled`` | ``interrupted`` (the server stopped under it). Every step is an event in the session's log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from opentelemetry import context as otel_context

from service.app.access import Principal, claim_session
from service.app.ports import EventLog, SessionStore
from service.app.stream import HoldingSink, LogSink
from service.app.workspaces import Workspaces
from service.domain.engine import Outcome, Progress, ReactEngine, TaskRequest, TaskResult
from service.domain.errors import Conflict, Invalid, LimitExceeded, NotFound, Unavailable
from service.domain.events import ErrorEvent, Event, TaskCancelled, utc_now
from service.domain.llm import Message
from service.domain.models import Task, TaskStatus, Todo, new_session_id, new_task_id
from service.observability.metrics import Metrics
from service.observability.tracing import task_trace

log = structlog.get_logger("service.runner")

INTERRUPTED_BY_RESTART = "the server stopped while the task ran"
INTERRUPTED_BY_SHUTDOWN = "the server shut down before the task finished"


class SessionTodoList:
    """The todo tools' view of a session's todos, kept in the session store."""

    def __init__(self, store: SessionStore, session_id: str) -> None:
        self._store = store
        self._session_id = session_id

    async def read(self) -> list[Todo]:
        return await self._store.get_todos(self._session_id)

    async def write(self, todos: Sequence[Todo]) -> None:
        await self._store.set_todos(self._session_id, todos)


@dataclass(slots=True)
class _Handle:
    task: Task
    trace_context: otel_context.Context
    """The trace the task's spans join (its submitting request's)."""
    accepted: float = field(default_factory=time.monotonic)
    running_since: float | None = None
    job: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    interrupted: bool = False
    started: bool = False
    progress: Progress = field(default_factory=Progress)
    finishing: bool = False
    """The outcome is decided and being stored: a cancel now would only lose it."""


class TaskRunner:
    def __init__(
        self,
        store: SessionStore,
        events: EventLog,
        engine: ReactEngine,
        workspaces: Workspaces,
        *,
        max_task_chars: int,
        max_tasks_per_client: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._events = events
        self._engine = engine
        self._workspaces = workspaces
        self._max_task_chars = max_task_chars
        self._max_tasks_per_client = max_tasks_per_client
        self._metrics = metrics if metrics is not None else Metrics(process=False)
        self._handles: dict[str, _Handle] = {}
        self._by_session: dict[str, str] = {}
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running_count(self) -> int:
        return len(self._handles)

    async def recover(self) -> list[Task]:
        """Mark the tasks a crash left ``queued`` or ``running`` as ``interrupted``; their streams get an error."""
        tasks = await self._store.interrupt_unfinished_tasks(INTERRUPTED_BY_RESTART)
        for task in tasks:
            await self._events.append(
                ErrorEvent(
                    session_id=task.session_id,
                    task_id=task.id,
                    trace_id=task.trace_id,
                    error=INTERRUPTED_BY_RESTART,
                    recoverable=False,
                )
            )
            log.warning("task_interrupted", task_id=task.id, session_id=task.session_id, reason="restart")
        return tasks

    async def submit(self, principal: Principal, text: str, session_id: str | None = None) -> Task:
        """Store a task and start it; returns at once with the task ``queued`` (it runs in the background)."""
        if self._draining:
            raise Unavailable("the server is shutting down; submit the task again (to another replica)")
        if not text.strip():
            raise Invalid("task must not be empty")
        if len(text) > self._max_task_chars:
            raise Invalid(f"task is longer than {self._max_task_chars} characters")
        # Checked before the session is claimed (a refused task leaves nothing behind) and again after the await.
        self._check_task_cap(principal)
        session = await claim_session(self._store, principal, session_id or new_session_id())
        if session.id in self._by_session:
            raise Conflict(f"session {session.id!r} is running task {self._by_session[session.id]}; "
                           "wait for it or cancel it")
        self._check_task_cap(principal)
        trace_id, trace_context = task_trace()
        task = Task(id=new_task_id(), session_id=session.id, owner=principal.subject, text=text, trace_id=trace_id)
        handle = _Handle(task, trace_context)
        # Reserved before the first await below so that a concurrent submit on this session sees it.
        self._handles[task.id] = handle
        self._by_session[session.id] = task.id
        self._metrics.tasks_in_progress.set(len(self._handles))
        try:
            await self._store.create_task(task)
        except BaseException:
            self._release(handle)
            raise
        handle.job = asyncio.create_task(self._execute(handle), name=f"task {task.id}")
        self._metrics.tasks_submitted.inc()
        log.info("task_submitted", task_id=task.id, session_id=session.id, subject=principal.subject)
        return task

    def _check_task_cap(self, principal: Principal) -> None:
        owned = sum(1 for h in self._handles.values() if h.task.owner == principal.subject)
        if owned >= self._max_tasks_per_client:
            raise LimitExceeded(f"{owned} tasks are running for this client (ALEX_MAX_TASKS_PER_CLIENT)")

    async def get(self, principal: Principal, task_id: str) -> Task:
        task = await self._store.get_task(task_id)
        if task is None or (task.owner != principal.subject and not principal.is_admin):
            raise NotFound(f"task {task_id!r} not found")
        return task

    async def cancel(self, principal: Principal, task_id: str, reason: str = "cancelled by the client") -> Task:
        """Ask a queued or running task to stop; idempotent while it stops. A finished task is a :class:`Conflict`."""
        task = await self._store.get_task(task_id)
        if task is None or task.owner != principal.subject:
            raise NotFound(f"task {task_id!r} not found")
        handle = self._handles.get(task_id)
        if handle is None:
            if task.status.finished:
                raise Conflict(f"task {task_id} is already {task.status.value}")
            # Stored as unfinished but not running here: left by a crash and not yet recovered.
            raise Conflict(f"task {task_id} is not running on this server")
        self._request_cancel(handle, reason)
        return handle.task

    async def cancel_session(self, session_id: str, reason: str) -> None:
        """Stop the session's running task, if any, and wait until it has stopped."""
        task_id = self._by_session.get(session_id)
        handle = self._handles.get(task_id) if task_id else None
        if handle is None:
            return
        self._request_cancel(handle, reason)
        if handle.job is not None:
            await asyncio.wait([handle.job])

    def begin_drain(self) -> None:
        """Refuse new tasks from now on (SIGTERM arrived)."""
        self._draining = True

    async def shutdown(self, grace_seconds: float) -> None:
        """Let running tasks finish for ``grace_seconds``, then cancel the rest and store them as interrupted."""
        self._draining = True
        jobs = [h.job for h in self._handles.values() if h.job is not None]
        if jobs and grace_seconds > 0:
            log.info("drain_waiting_for_tasks", tasks=len(jobs), grace_seconds=grace_seconds)
            await asyncio.wait(jobs, timeout=grace_seconds)
        leftover = list(self._handles.values())
        for handle in leftover:
            handle.interrupted = True
            self._request_cancel(handle, INTERRUPTED_BY_SHUTDOWN)
        jobs = [h.job for h in leftover if h.job is not None]
        if jobs:
            await asyncio.wait(jobs)

    def _request_cancel(self, handle: _Handle, reason: str) -> None:
        if handle.cancel_reason is not None or handle.job is None:
            return
        handle.cancel_reason = reason
        # A job cancelled before its first step never enters its body (nothing would record the cancellation):
        # one that has not started sees the reason when it does. One that is storing its outcome is let finish.
        if handle.started and not handle.finishing:
            handle.job.cancel()

    def _release(self, handle: _Handle) -> None:
        self._handles.pop(handle.task.id, None)
        if self._by_session.get(handle.task.session_id) == handle.task.id:
            del self._by_session[handle.task.session_id]
        self._metrics.tasks_in_progress.set(len(self._handles))

    async def _execute(self, handle: _Handle) -> None:
        task = handle.task
        bound = structlog.contextvars.bind_contextvars(task_id=task.id, session_id=task.session_id)
        attached = otel_context.attach(handle.trace_context)
        conversation: list[Message] = []
        loaded = False
        sink = HoldingSink(LogSink(self._events))
        try:
            handle.started = True
            if handle.cancel_reason is not None:
                raise asyncio.CancelledError
            handle.running_since = time.monotonic()
            self._metrics.task_queue_wait.observe(handle.running_since - handle.accepted)
            task.status, task.started_at = TaskStatus.RUNNING, utc_now()
            await self._store.update_task(task)
            session = await self._store.get_session(task.session_id)
            conversation = [Message.from_dict(m) for m in (session.messages if session else [])]
            loaded = True
            workspace = await self._workspaces.ensure(task.session_id)
            request = TaskRequest(task.session_id, task.id, task.text, task.trace_id)
            todos = SessionTodoList(self._store, task.session_id)
            result = await self._engine.run(request, conversation, sink, workspace=workspace, todos=todos,
                                            progress=handle.progress)
            handle.finishing = True
            self._record(task, result)
        except asyncio.CancelledError:
            handle.finishing = True
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            sink.held = self._cancelled(handle)
        except Exception as exc:  # a bug or a storage failure: the task fails visibly, the server goes on
            handle.finishing = True
            log.exception("task_crashed", task_id=task.id)
            task.status, task.error = TaskStatus.FAILED, f"internal error: {type(exc).__name__}"
            sink.held = ErrorEvent(session_id=task.session_id, task_id=task.id, trace_id=task.trace_id,
                                   error=task.error, recoverable=False)
        finally:
            try:
                await self._settle(handle, conversation if loaded else None, sink.held)
            finally:
                otel_context.detach(attached)
                structlog.contextvars.reset_contextvars(**bound)

    async def _settle(self, handle: _Handle, conversation: list[Message] | None, last: Event | None) -> None:
        """Store the outcome, free the session, then send the task's last event (in that order: a client acting on
        the event finds the task finished and the session free)."""
        handle.finishing = True
        task = handle.task
        task.finished_at = utc_now()
        try:
            if conversation is not None:
                await self._store.save_messages(task.session_id, [m.to_dict() for m in conversation])
            await self._store.update_task(task)
        except Exception:
            log.exception("task_not_saved", task_id=task.id)
        finally:
            self._release(handle)
            if last is not None:
                try:
                    await self._events.append(last)
                except Exception:
                    log.exception("terminal_event_lost", task_id=task.id)
            seconds = 0.0 if handle.running_since is None else time.monotonic() - handle.running_since
            self._observe_finished(task, seconds)
            log.info("task_finished", task_id=task.id, status=task.status.value, iterations=task.iterations,
                     total_tokens=task.usage.get("total_tokens", 0), seconds=round(seconds, 3), error=task.error)

    def _observe_finished(self, task: Task, seconds: float) -> None:
        outcome = task.status.value
        metrics = self._metrics
        metrics.tasks_finished.labels(outcome).inc()
        metrics.task_duration.labels(outcome).observe(seconds)
        metrics.task_iterations.observe(task.iterations)

    @staticmethod
    def _record(task: Task, result: TaskResult) -> None:
        task.status = TaskStatus.COMPLETED if result.outcome is Outcome.COMPLETED else TaskStatus.FAILED
        task.final_answer = result.final_answer
        task.iterations = result.iterations
        task.usage = result.usage.to_dict()
        task.error = result.error

    @staticmethod
    def _cancelled(handle: _Handle) -> TaskCancelled:
        """Record the cancellation on the task; returns its event."""
        task = handle.task
        reason = handle.cancel_reason or "cancelled"
        task.status = TaskStatus.INTERRUPTED if handle.interrupted else TaskStatus.CANCELLED
        task.error = reason if handle.interrupted else None
        task.iterations = handle.progress.iterations
        task.usage = handle.progress.usage.to_dict()
        return TaskCancelled(session_id=task.session_id, task_id=task.id, trace_id=task.trace_id, reason=reason)
