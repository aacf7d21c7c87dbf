"""Request and response bodies of the REST API (what the OpenAPI document shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SESSION_ID = r"^[A-Za-z0-9._-]{1,128}$"


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task: str = Field(min_length=1, description="What the agent should do.")
    session_id: str | None = Field(default=None, pattern=SESSION_ID,
                                   description="Continue this session (created if new); a new one when absent.")


class TaskAccepted(BaseModel):
    status: Literal["accepted"] = "accepted"
    session_id: str
    task_id: str
    message: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TaskView(BaseModel):
    task_id: str
    session_id: str
    task: str
    status: Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
    final_answer: str | None
    iterations: int
    usage: Usage
    error: str | None
    trace_id: str
    created_at: str
    started_at: str | None
    finished_at: str | None


class SessionList(BaseModel):
    sessions: list[str]


class TodoView(BaseModel):
    id: str
    content: str
    status: Literal["pending", "in_progress", "completed"]


class SessionView(BaseModel):
    id: str
    messages: list[dict[str, Any]]
    todos: list[TodoView]
    created_at: str
    updated_at: str


class EventList(BaseModel):
    events: list[dict[str, Any]]
    next_after: str | None = Field(description="Pass as ?after= for the next page; null when this page is short.")


class Health(BaseModel):
    status: str


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
