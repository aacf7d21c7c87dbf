"""The task board of a single process: an in-memory queue and the session and owner rules, no leases.

Everything runs on the event loop that owns the board (no locks). The process is the only one that runs tasks,
so a task stored as unfinished at start was left by this process's previous run (``exclusive``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from service.domain.errors import Conflict, LimitExceeded
from service.domain.models import Task


class LocalTaskBoard:
    """``TaskBoard`` for one process (see the module docstring)."""

    exclusive = True

    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._by_session: dict[str, str] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._taking = True
        self._on_cancel: Callable[[str, str], None] = lambda task_id, reason: None

    def bind(self, on_cancel: Callable[[str, str], None], on_lost: Callable[[str], None],
             on_reaped: Callable[[str], Awaitable[None]]) -> None:
        self._on_cancel = on_cancel

    async def start(self) -> None:
        """Nothing to start."""

    async def reserve(self, task: Task, max_per_owner: int) -> None:
        holder = self._by_session.get(task.session_id)
        if holder is not None:
            raise Conflict(f"session {task.session_id!r} is running task {holder}; wait for it or cancel it")
        owned = self._by_owner.get(task.owner, set())
        if len(owned) >= max_per_owner:
            raise LimitExceeded(f"{len(owned)} tasks are running for this client (ALEX_MAX_TASKS_PER_CLIENT)")
        self._by_session[task.session_id] = task.id
        self._by_owner.setdefault(task.owner, set()).add(task.id)

    async def enqueue(self, task: Task) -> None:
        self._queue.append(task.id)
        self._queued.add(task.id)
        self._wake()

    async def take(self, limit: int) -> list[str]:
        while self._taking and not self._queued:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        taken: list[str] = []
        while self._taking and self._queue and len(taken) < limit:
            task_id = self._queue.popleft()
            if task_id in self._queued:  # else withdrawn: its place in the deque is stale
                self._queued.discard(task_id)
                taken.append(task_id)
        return taken

    async def withdraw(self, task_id: str) -> bool:
        if task_id not in self._queued:
            return False
        self._queued.discard(task_id)
        return True

    async def request_cancel(self, task_id: str, reason: str) -> None:
        self._on_cancel(task_id, reason)

    async def release(self, task: Task) -> None:
        if self._by_session.get(task.session_id) == task.id:
            del self._by_session[task.session_id]
        owned = self._by_owner.get(task.owner)
        if owned is not None:
            owned.discard(task.id)
            if not owned:
                del self._by_owner[task.owner]

    async def session_task(self, session_id: str) -> str | None:
        return self._by_session.get(session_id)

    async def withdraw_all(self) -> list[str]:
        waiting = [task_id for task_id in self._queue if task_id in self._queued]
        self._queued.clear()
        self._queue.clear()
        return waiting

    def stop_taking(self) -> None:
        self._taking = False
        self._wake()

    async def close(self) -> None:
        self.stop_taking()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
