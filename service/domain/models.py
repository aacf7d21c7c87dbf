"""Sessions, tasks and todos: the records the service keeps."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from service.domain.events import format_timestamp, utc_now

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
"""Session ids name a workspace folder too; this keeps them safe as one path segment (``.`` and ``..`` aside)."""


def is_valid_session_id(session_id: str) -> bool:
    return bool(SESSION_ID_PATTERN.fullmatch(session_id)) and session_id not in (".", "..")


def new_session_id() -> str:
    return "s_" + secrets.token_hex(8)


def new_task_id() -> str:
    return "t_" + secrets.token_hex(8)


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self not in (TaskStatus.QUEUED, TaskStatus.RUNNING)


class TodoStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class Todo:
    id: str
    content: str
    status: TodoStatus = TodoStatus.PENDING

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "content": self.content, "status": self.status.value}

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> Todo:
        return cls(id=str(body["id"]), content=str(body["content"]), status=TodoStatus(body.get("status", "pending")))


@dataclass(slots=True)
class Session:
    id: str
    owner: str
    created_at: datetime = field(default_factory=utc_now)
    updated_at: datetime = field(default_factory=utc_now)
    messages: list[dict[str, Any]] = field(default_factory=list)
    """The conversation so far, as :meth:`service.domain.llm.Message.to_dict` writes it."""
    todos: list[Todo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "messages": self.messages,
            "todos": [t.to_dict() for t in self.todos],
            "created_at": format_timestamp(self.created_at),
            "updated_at": format_timestamp(self.updated_at),
        }


@dataclass(slots=True)
class Task:
    id: str
    session_id: str
    owner: str
    text: str
    status: TaskStatus = TaskStatus.QUEUED
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    final_answer: str | None = None
    iterations: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0,
                                                           "total_tokens": 0})
    error: str | None = None
    trace_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        def ts(moment: datetime | None) -> str | None:
            return format_timestamp(moment) if moment else None

        return {
            "task_id": self.id,
            "session_id": self.session_id,
            "task": self.text,
            "status": self.status.value,
            "final_answer": self.final_answer,
            "iterations": self.iterations,
            "usage": self.usage,
            "error": self.error,
            "trace_id": self.trace_id,
            "created_at": ts(self.created_at),
            "started_at": ts(self.started_at),
            "finished_at": ts(self.finished_at),
        }
