"""The todo tools: the model's plan for the task, kept in the session's todo list."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from service.domain.models import Todo, TodoStatus
from service.domain.tools import ToolContext, ToolError

_MARKS = {TodoStatus.PENDING: "[ ]", TodoStatus.IN_PROGRESS: "[~]", TodoStatus.COMPLETED: "[x]"}

_WRITE_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "todos": {
            "type": "array",
            "description": "The whole new list, in order; it replaces the current one.",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "minLength": 1, "description": "A short unique id."},
                    "content": {"type": "string", "minLength": 1, "description": "What is to be done."},
                    "status": {"type": "string", "enum": [status.value for status in TodoStatus]},
                },
                "required": ["id", "content", "status"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["todos"],
    "additionalProperties": False,
}

_READ_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "required": [],
    "additionalProperties": False,
}


def render_todos(todos: Sequence[Todo]) -> str:
    """One line per todo, ``[ ] id. content`` (``[~]`` in progress, ``[x]`` completed), or ``no todos``."""
    if not todos:
        return "no todos"
    return "\n".join(f"{_MARKS[todo.status]} {todo.id}. {todo.content}" for todo in todos)


class TodoWriteTool:
    """Replaces the session's todo list with the one given; duplicate ids raise :class:`ToolError`."""

    name = "todo_write"
    description = (
        "Replace your todo list for this task with the given list (send every item, not just the changed "
        "ones; an empty list clears it). Use it to plan multi-step work and to mark progress: keep one item "
        "in_progress at a time and mark items completed as soon as they are done. Returns the new list."
    )
    parameters = _WRITE_PARAMETERS

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        todos = [
            Todo(id=str(item["id"]), content=str(item["content"]), status=TodoStatus(item["status"]))
            for item in arguments["todos"]
        ]
        duplicates = sorted(id_ for id_, count in Counter(todo.id for todo in todos).items() if count > 1)
        if duplicates:
            raise ToolError(f"todo ids must be unique; repeated: {', '.join(duplicates)}")
        await context.todos.write(todos)
        return render_todos(todos)


class TodoReadTool:
    """Returns the session's todo list as :func:`render_todos` shows it."""

    name = "todo_read"
    description = "Show your current todo list for this task, with each item's id and status."
    parameters = _READ_PARAMETERS

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        return render_todos(await context.todos.read())
