"""The tool protocol, the registry the engine calls tools through, and argument checking against a tool's schema."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.domain.llm import ToolSpec
from service.domain.models import Todo


class ToolError(Exception):
    """The tool could not do what was asked. The message goes to the model, which may try again."""


class TodoList(Protocol):
    """The session's todo list, as the todo tools read and replace it."""

    async def read(self) -> list[Todo]: ...

    async def write(self, todos: Sequence[Todo]) -> None: ...


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool may use while it runs: its session's workspace folder, its todo list, and a way to stream output.

    ``workspace`` is the folder's real path (absolute, no symbolic link on the way), so tools need not resolve
    it again. ``stream`` sends one chunk of output to the session's clients as a ``tool_call_stream`` event.
    """

    session_id: str
    workspace: Path
    todos: TodoList
    stream: Callable[[str], Awaitable[None]]


class Tool(Protocol):
    """A capability the model can call.

    ``parameters`` is the JSON schema of the arguments (an object schema). ``run`` gets arguments already checked
    against it and returns the result text for the model; it raises :class:`ToolError` for a failure the model
    should see. Cancelling the task that awaits ``run`` must stop the tool's work (kill its processes) before the
    cancellation propagates.
    """

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def parameters(self) -> Mapping[str, Any]: ...

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str: ...


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def check_arguments(schema: Mapping[str, Any], value: Any, where: str = "arguments") -> list[str]:
    """Check ``value`` against the subset of JSON schema our tools use; return the problems, empty when none.

    Covers ``type``, ``properties``, ``required``, ``additionalProperties: false``, ``items``, ``enum``,
    ``minimum``/``maximum`` and ``minLength``/``maxLength``: enough to give the model a precise error.
    """
    problems: list[str] = []
    expected = schema.get("type")
    if isinstance(expected, str):
        types = _JSON_TYPES.get(expected, (object,))
        # bool is an int in Python, never in JSON.
        if not isinstance(value, types) or (expected in ("integer", "number") and isinstance(value, bool)):
            return [f"{where} must be of type {expected}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where} must be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where} must be at most {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{where} must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{where} must be at most {schema['maxLength']} characters")
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                problems.append(f"{where}.{name} is required")
        for name, item in value.items():
            if name in properties:
                problems.extend(check_arguments(properties[name], item, f"{where}.{name}"))
            elif schema.get("additionalProperties") is False:
                problems.append(f"{where}.{name} is not a known argument")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems.extend(check_arguments(schema["items"], item, f"{where}[{index}]"))
    return problems


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_arguments(raw: str) -> dict[str, Any]:
    """The model's argument text as an object; raises :class:`ToolError` with a message the model can act on."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError):
            raise ToolError(f"arguments are not valid JSON: {exc}") from None
        raise ToolError(f"arguments are not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise ToolError("arguments must be a JSON object")
    return value


class ToolRegistry:
    """The tools a task may call, by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self._tools[tool.name] = tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[ToolSpec]:
        return [ToolSpec(t.name, t.description, t.parameters) for t in self._tools.values()]

    async def run(self, name: str, arguments: Mapping[str, Any], context: ToolContext) -> str:
        """Run a tool after checking its arguments; unknown tools and bad arguments raise :class:`ToolError`."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            raise ToolError(f"there is no tool named {name!r}; the tools are: {known}")
        problems = check_arguments(tool.parameters, dict(arguments))
        if problems:
            raise ToolError("invalid arguments: " + "; ".join(problems))
        return await tool.run(arguments, context)
