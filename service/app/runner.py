"""TaskRunner: queues tasks, runs those its workers take, detached from any HTTP connection, cancels, drains.

A task belongs to its session's owner. One task runs per session at a time; a subject has at most
``max_tasks_per_client`` queued or running at once. A task's life: ``queued`` → ``running`` → ``completed`` |
``failed`` | ``cancelled`` | ``interrupted`` (the server stopped under it). Every step is an event in the session's
log. Submitting puts the task on the :class:`~service.app.ports.TaskBoard`; this process's worker takes up to
``concurrency`` of them at a time, wherever they were submitted (with several replicas, any replica's worker may
take any task, and a cancel request finds the replica that holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog
from opentelemetry import context as otel_context

from service.app.access import Principal, claim_session, claimable_session
from service.app.ports import EventLog, SessionStore, TaskBoard
from service.app.stream import HoldingSink, LogSink
from service.app.workspaces import Workspaces
from service.domain.engine import Outcome, Progress, ReactEngine, TaskRequest, TaskResult
from service.domain.errors import Conflict, Invalid, NotFound, Unavailable
from service.domain.events import ErrorEvent, Event, TaskCancelled, utc_now
from service.domain.llm import Message
from service.domain.models import Task, TaskStatus, Todo, new_session_id, new_task_id
from service.observability.metrics import Metrics
from service.observability.tracing import continue_trace, task_trace

log = structlog.get_logger("service.runner")

INTERRUPTED_BY_RESTART = "the server stopped while the task ran"
INTERRUPTED_BY_SHUTDOWN = "the server shut down before the task finished"
INTERRUPTED_BY_LOST_REPLICA = "the replica running the task stopped answering (its lease expired)"

WORKER_RETRY_SECONDS = (0.1, 0.2, 0.5, 1.0)
"""How long the worker waits after the board failed to answer, the n-th time in a row (then the last)."""
SETTLE_RETRY_SECONDS = 0.5
WORKER_STOP_SECONDS = 2.0
CANCEL_POLL_SECONDS = 0.05
CANCEL_WAIT_SECONDS = 30.0
"""How long deleting a session waits for its task to stop on another replica (its lease runs out sooner)."""
SUBMITTED_CONTEXTS = 1024
"""Trace contexts of tasks submitted here kept for the worker that takes them (others' workers start new ones)."""


class SessionTodoList:
    """The todo tools' view of a session's todos, kept in the session store.

    The list is read with the session when the task starts and kept in step with every write: only the session's
    running task writes its todos (one task runs per session at a time), so a read needs no trip to the store.
    """

    def __init__(self, store: SessionStore, session_id: str, todos: Sequence[Todo]) -> None:
        self._store = store
        self._session_id = session_id
        self._todos = list(todos)

    async def read(self) -> list[Todo]:
        return list(self._todos)

    async def write(self, todos: Sequence[Todo]) -> None:
        await self._store.set_todos(self._session_id, todos)
        self._todos = list(todos)


@dataclass(slots=True)
class _Handle:
    task: Task
    trace_context: otel_context.Context
    """The trace the task's spans join (its submitting request's)."""
    running_since: float | None = None
    job: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    interrupted: bool = False
    started: bool = False
    progress: Progress = field(default_factory=Progress)
    finishing: bool = False
    """The outcome is decided and being stored: a cancel now would only lose it."""
    orphaned: bool = False
    """Another replica declared the task interrupted (this one lost its lease): store nothing more of it."""


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
        board: TaskBoard,
        metrics: Metrics | None = None,
        concurrency: int = 8,
        replica: str = "local",
        settle_retry_seconds: float = 0.0,
        emit_burst: int = 1,
    ) -> None:
        """``emit_burst``: events a task emits in one turn of the loop before it lets the streams run (see
        :class:`~service.app.stream.LogSink`)."""
        self._store = store
        self._events = events
        self._engine = engine
        self._workspaces = workspaces
        self._max_task_chars = max_task_chars
        self._max_tasks_per_client = max_tasks_per_client
        self._metrics = metrics if metrics is not None else Metrics(process=False)
        self._board = board
        self._board.bind(self._on_cancel, self._on_lost, self._on_reaped)
        self._concurrency = concurrency
        self._replica = replica
        self._settle_retry_seconds = settle_retry_seconds
        self._emit_burst = emit_burst
        self._handles: dict[str, _Handle] = {}
        """The tasks this process holds (taken from the board, not yet released)."""
        self._by_session: dict[str, str] = {}
        self._contexts: OrderedDict[str, tuple[otel_context.Context, contextvars.Context]] = OrderedDict()
        self._early_cancels: dict[str, str] = {}
        """Cancel requests that arrived between a take and the task's handle."""
        self._worker: asyncio.Task[None] | None = None
        self._slot_freed: asyncio.Event | None = None
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running_count(self) -> int:
        return len(self._handles)

    async def start(self) -> None:
        """Start the board and this process's worker (also started by the first submit)."""
        await self._board.start()
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._worker is None and not self._draining:
            self._slot_freed = asyncio.Event()
            self._worker = asyncio.create_task(self._work(), name="task worker")

    async def recover(self) -> list[Task]:
        """Mark the tasks a crash left ``queued`` or ``running`` as ``interrupted``; their streams get an error.

        Only when this process is the board's only user: with several replicas, a task is someone's until its
        lease expires, and the board reports those (``on_reaped``).
        """
        if not self._board.exclusive:
            return []
        tasks = await self._store.interrupt_unfinished_tasks(INTERRUPTED_BY_RESTART)
        for task in tasks:
            await self._append_interrupted(task, INTERRUPTED_BY_RESTART)
            log.warning("task_interrupted", task_id=task.id, session_id=task.session_id, reason="restart")
        return tasks

    async def _append_interrupted(self, task: Task, reason: str) -> None:
        await self._events.append(
            ErrorEvent(session_id=task.session_id, task_id=task.id, trace_id=task.trace_id, error=reason,
                       recoverable=False))

    async def submit(self, principal: Principal, text: str, session_id: str | None = None) -> Task:
        """Store a task and queue it; returns at once with the task ``queued`` (a worker runs it)."""
        if self._draining:
            raise Unavailable("the server is shutting down; submit the task again (to another replica)")
        if not text.strip():
            raise Invalid("task must not be empty")
        if len(text) > self._max_task_chars:
            raise Invalid(f"task is longer than {self._max_task_chars} characters")
        session_id = session_id or new_session_id()
        # The session and cap rules are checked before the session is claimed: a refused task leaves nothing
        # behind. Ownership first, so that a refusal never speaks of another subject's session.
        await claimable_session(self._store, principal, session_id)
        trace_id, trace_context = task_trace()
        task = Task(id=new_task_id(), session_id=session_id, owner=principal.subject, text=text, trace_id=trace_id)
        await self._board.reserve(task, self._max_tasks_per_client)
        stored = False
        try:
            await claim_session(self._store, principal, session_id)
            await self._store.create_task(task)
            stored = True
            await self._board.enqueue(task)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._board.release(task)
            if stored:  # the caller gets an error, so no queued task may stay behind under this id
                task.status, task.finished_at = TaskStatus.FAILED, utc_now()
                task.error = f"not queued: {exc}" if str(exc) else "not queued"
                with contextlib.suppress(Exception):
                    await self._store.update_task(task)
            raise
        # The request's context (its log fields: request id, subject) goes with the task if it runs here.
        self._contexts[task.id] = (trace_context, contextvars.copy_context())
        while len(self._contexts) > SUBMITTED_CONTEXTS:
            self._contexts.popitem(last=False)
        self._metrics.tasks_submitted.inc()
        log.info("task_submitted", task_id=task.id, session_id=session_id, subject=principal.subject)
        self._ensure_worker()
        return task

    async def _work(self) -> None:
        """Take tasks from the board while there are free places, until draining."""
        failures = 0
        slot_freed = self._slot_freed
        assert slot_freed is not None
        while not self._draining:
            free = self._concurrency - len(self._handles)
            if free <= 0:
                slot_freed.clear()
                await slot_freed.wait()
                continue
            try:
                taken = await self._board.take(free)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = WORKER_RETRY_SECONDS[min(failures, len(WORKER_RETRY_SECONDS) - 1)]
                if failures == 0:
                    log.warning("task_queue_unavailable", error=str(exc) or type(exc).__name__)
                failures += 1
                await asyncio.sleep(delay)
                continue
            if failures:
                log.info("task_queue_back", failures=failures)
                failures = 0
            for task_id in taken:
                await self._begin(task_id)

    async def _begin(self, task_id: str) -> None:
        """Run a task just taken from the board (or settle it at once when it was cancelled or deleted)."""
        try:
            task = await self._store.get_task(task_id)
        except Exception:
            log.exception("task_not_loaded", task_id=task_id)
            task = None
        if task is None or task.status.finished:
            # Its session was deleted meanwhile, or it was settled elsewhere: nothing to run.
            if task is not None:
                with contextlib.suppress(Exception):
                    await self._board.release(task)
            return
        submitted = self._contexts.pop(task_id, None)
        trace_context, context = submitted if submitted is not None else (continue_trace(task.trace_id), None)
        handle = _Handle(task, trace_context)
        handle.cancel_reason = self._early_cancels.pop(task_id, None)
        self._handles[task.id] = handle
        self._by_session[task.session_id] = task.id
        self._metrics.tasks_in_progress.set(len(self._handles))
        handle.job = asyncio.create_task(self._execute(handle), name=f"task {task.id}",
                                         context=context.copy() if context is not None else None)

    def _check_owner(self, principal: Principal, task: Task | None, task_id: str) -> Task:
        if task is None or task.owner != principal.subject:
            raise NotFound(f"task {task_id!r} not found")
        return task

    async def get(self, principal: Principal, task_id: str) -> Task:
        task = await self._store.get_task(task_id)
        if task is None or (task.owner != principal.subject and not principal.is_admin):
            raise NotFound(f"task {task_id!r} not found")
        return task

    async def cancel(self, principal: Principal, task_id: str, reason: str = "cancelled by the client") -> Task:
        """Ask a queued or running task to stop; idempotent while it stops. A finished task is a :class:`Conflict`.

        A queued task is cancelled at once, here; a running one by the replica that runs it (this one or
        another), which appends ``task_cancelled`` once it has stopped.
        """
        task = self._check_owner(principal, await self._store.get_task(task_id), task_id)
        handle = self._handles.get(task_id)
        if handle is not None:
            self._request_cancel(handle, reason)
            return handle.task
        if task.status.finished:
            raise Conflict(f"task {task_id} is already {task.status.value}")
        if await self._board.withdraw(task_id):
            await self._cancel_queued(task, reason)
            return task
        if self._board.exclusive:
            # Stored as unfinished but not running here: left by a crash and not yet recovered.
            raise Conflict(f"task {task_id} is not running on this server")
        await self._board.request_cancel(task_id, reason)
        return task

    async def _cancel_queued(self, task: Task, reason: str, *, interrupted: bool = False) -> None:
        """Settle a task nobody took: it never ran."""
        task.status = TaskStatus.INTERRUPTED if interrupted else TaskStatus.CANCELLED
        task.error = reason if interrupted else None
        task.finished_at = utc_now()
        try:
            await self._store.update_task(task)
        finally:
            await self._board.release(task)
        await self._events.append(TaskCancelled(session_id=task.session_id, task_id=task.id,
                                                trace_id=task.trace_id, reason=reason))
        self._observe_finished(task, 0.0)
        log.info("task_finished", task_id=task.id, status=task.status.value, iterations=0, total_tokens=0,
                 seconds=0.0, error=task.error)

    async def cancel_session(self, session_id: str, reason: str) -> None:
        """Stop the session's queued or running task, if any, and wait until it has stopped."""
        task_id = self._by_session.get(session_id)
        handle = self._handles.get(task_id) if task_id else None
        if handle is not None:
            self._request_cancel(handle, reason)
            if handle.job is not None:
                await asyncio.wait([handle.job])
            return
        task_id = await self._board.session_task(session_id)
        task = await self._store.get_task(task_id) if task_id else None
        if task is None or task.status.finished:
            return
        if await self._board.withdraw(task.id):
            await self._cancel_queued(task, reason)
            return
        await self._board.request_cancel(task.id, reason)
        # Running on another replica: wait until it says it has stopped (or its lease runs out).
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while time.monotonic() < deadline:
            current = await self._store.get_task(task.id)
            if current is None or current.status.finished:
                return
            await asyncio.sleep(CANCEL_POLL_SECONDS)
        log.warning("cancel_not_confirmed", task_id=task.id, session_id=session_id)

    def begin_drain(self) -> None:
        """Refuse new tasks and take no more from the board from now on (SIGTERM arrived)."""
        self._draining = True
        self._board.stop_taking()
        if self._slot_freed is not None:
            self._slot_freed.set()

    async def shutdown(self, grace_seconds: float) -> None:
        """Let running tasks finish for ``grace_seconds``, then cancel the rest and store them as interrupted.

        Tasks still queued stay queued for the other replicas, except on a board of one process, where nobody
        else will run them: they are settled as interrupted.
        """
        self.begin_drain()
        worker, self._worker = self._worker, None
        if worker is not None:
            # It stops by itself once the board stops taking (a read of a shared queue ends within a second).
            await asyncio.wait([worker], timeout=WORKER_STOP_SECONDS)
            # Cancelled again until it ends: on Python 3.11 a cancel can be lost inside a client library's
            # asyncio.wait_for (CPython issue #86296).
            while not worker.done():
                worker.cancel()
                await asyncio.wait([worker], timeout=1.0)
            if not worker.cancelled() and worker.exception() is not None:
                log.error("task_worker_failed", error=repr(worker.exception()))
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
        for task_id in await self._board.withdraw_all():
            task = await self._store.get_task(task_id)
            if task is not None:
                with contextlib.suppress(Exception):
                    await self._cancel_queued(task, INTERRUPTED_BY_SHUTDOWN, interrupted=True)
        await self._board.close()

    # --- what the board tells -----------------------------------------------------------------------------------

    def _on_cancel(self, task_id: str, reason: str) -> None:
        handle = self._handles.get(task_id)
        if handle is not None:
            self._request_cancel(handle, reason)
        else:
            self._early_cancels[task_id] = reason
            while len(self._early_cancels) > SUBMITTED_CONTEXTS:
                self._early_cancels.pop(next(iter(self._early_cancels)))

    def _on_lost(self, task_id: str) -> None:
        handle = self._handles.get(task_id)
        if handle is None:
            return
        log.error("task_lease_lost", task_id=task_id, session_id=handle.task.session_id)
        handle.orphaned = True
        handle.interrupted = True
        self._request_cancel(handle, INTERRUPTED_BY_LOST_REPLICA)

    async def _on_reaped(self, task_id: str) -> None:
        task = await self._store.get_task(task_id)
        if task is None:
            return
        await self._append_interrupted(task, INTERRUPTED_BY_LOST_REPLICA)
        self._observe_finished(task, 0.0)
        log.warning("task_interrupted", task_id=task.id, session_id=task.session_id, reason="lease_expired")

    def _request_cancel(self, handle: _Handle, reason: str) -> None:
        if handle.cancel_reason is not None or handle.job is None:
            return
        handle.cancel_reason = reason
        # A job cancelled before its first step never enters its body (nothing would record the cancellation):
        # one that has not started sees the reason when it does. One that is storing its outcome is let finish.
        if handle.started and not handle.finishing:
            handle.job.cancel()

    def _forget(self, handle: _Handle) -> None:
        self._handles.pop(handle.task.id, None)
        if self._by_session.get(handle.task.session_id) == handle.task.id:
            del self._by_session[handle.task.session_id]
        self._metrics.tasks_in_progress.set(len(self._handles))
        if self._slot_freed is not None:
            self._slot_freed.set()

    async def _execute(self, handle: _Handle) -> None:
        task = handle.task
        bound = structlog.contextvars.bind_contextvars(task_id=task.id, session_id=task.session_id)
        attached = otel_context.attach(handle.trace_context)
        conversation: list[Message] = []
        loaded = False
        sink = HoldingSink(LogSink(self._events, self._emit_burst))
        try:
            handle.started = True
            if handle.cancel_reason is not None:
                raise asyncio.CancelledError
            handle.running_since = time.monotonic()
            task.status, task.started_at = TaskStatus.RUNNING, utc_now()
            self._metrics.task_queue_wait.observe(max(0.0, (task.started_at - task.created_at).total_seconds()))
            log.info("task_started", task_id=task.id, session_id=task.session_id, replica=self._replica)
            await self._store.update_task(task)
            session = await self._store.get_session(task.session_id)
            conversation = [Message.from_dict(m) for m in (session.messages if session else [])]
            loaded = True
            workspace = await self._workspaces.ensure(task.session_id)
            request = TaskRequest(task.session_id, task.id, task.text, task.trace_id)
            todos = SessionTodoList(self._store, task.session_id, session.todos if session else [])
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
        if handle.orphaned:
            # Another replica already stored it as interrupted and said so on its stream.
            self._forget(handle)
            log.warning("task_abandoned", task_id=task.id, reason=INTERRUPTED_BY_LOST_REPLICA)
            return
        try:
            await self._retrying(lambda: self._save(task, conversation), "task_not_saved", task.id)
        finally:
            self._forget(handle)
            try:
                await self._retrying(lambda: self._board.release(task), "task_not_released", task.id)
            finally:
                if last is not None:
                    try:
                        await self._events.append(last)
                    except Exception:
                        log.exception("terminal_event_lost", task_id=task.id)
            seconds = 0.0 if handle.running_since is None else time.monotonic() - handle.running_since
            self._observe_finished(task, seconds)
            log.info("task_finished", task_id=task.id, status=task.status.value, iterations=task.iterations,
                     total_tokens=task.usage.get("total_tokens", 0), seconds=round(seconds, 3), error=task.error)

    async def _save(self, task: Task, conversation: list[Message] | None) -> None:
        if conversation is not None:
            await self._store.save_messages(task.session_id, [m.to_dict() for m in conversation])
        await self._store.update_task(task)

    async def _retrying(self, write: Callable[[], Awaitable[None]], failure: str, task_id: str) -> None:
        """Run ``write``; while the store is :class:`Unavailable`, try again for ``settle_retry_seconds``."""
        deadline = time.monotonic() + self._settle_retry_seconds
        while True:
            try:
                await write()
                return
            except Unavailable:
                if time.monotonic() >= deadline:
                    log.exception(failure, task_id=task_id)
                    return
                await asyncio.sleep(SETTLE_RETRY_SECONDS)
            except Exception:
                log.exception(failure, task_id=task_id)
                return

    def _observe_finished(self, task: Task, seconds: float) -> None:
        outcome = task.status.value
        metrics = self._metrics
        metrics.tasks_finished_by(outcome).inc()
        metrics.task_duration_by(outcome).observe(seconds)
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
