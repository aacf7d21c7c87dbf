"""Fakes and helpers the tool tests share: an in-memory todo list, a stream collector, a context factory."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from service.domain.models import Todo
from service.domain.tools import ToolContext


class MemoryTodoList:
    """The :class:`service.domain.tools.TodoList` port, in memory."""

    def __init__(self, todos: Sequence[Todo] = ()) -> None:
        self.todos = list(todos)
        self.writes = 0

    async def read(self) -> list[Todo]:
        return list(self.todos)

    async def write(self, todos: Sequence[Todo]) -> None:
        self.todos = list(todos)
        self.writes += 1


class StreamCollector:
    """Records every streamed chunk; ``first`` is set when the first one arrives."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.first = asyncio.Event()

    async def __call__(self, chunk: str) -> None:
        self.chunks.append(chunk)
        self.first.set()

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def make_context(
    workspace: Path,
    todos: MemoryTodoList | None = None,
    stream: Callable[[str], Awaitable[None]] | None = None,
) -> ToolContext:
    return ToolContext(
        session_id="s_test",
        workspace=workspace,
        todos=todos if todos is not None else MemoryTodoList(),
        stream=stream if stream is not None else StreamCollector(),
    )


def processes_with(marker: str) -> list[int]:
    """The pids of live processes whose command line contains ``marker`` (zombies have none, so do not count)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker.encode() in cmdline.replace(b"\x00", b" "):
            found.append(int(entry.name))
    return found


async def wait_for_processes(marker: str, at_least: int, seconds: float = 3.0) -> list[int]:
    """Poll until ``at_least`` processes carry ``marker``; return those found by then."""
    deadline = time.monotonic() + seconds
    # Polling: nothing signals when the kernel starts or reaps a process we did not spawn.
    while len(found := processes_with(marker)) < at_least and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return found


async def wait_until_gone(marker: str, seconds: float = 3.0) -> list[int]:
    """Poll until no process carries ``marker``; return the survivors (empty when all are gone)."""
    deadline = time.monotonic() + seconds
    while (alive := processes_with(marker)) and time.monotonic() < deadline:  # noqa: ASYNC110 - as above
        await asyncio.sleep(0.05)
    return alive


def unique_sleep() -> str:
    """A ``sleep`` argument no other test run uses, so /proc can tell our processes apart: ``30.<digits>``."""
    return f"30.{secrets.randbelow(10**9):09d}1"
