"""An offline, deterministic :class:`~service.domain.llm.ChatModel` for demos and tests: no network, no key.

Without a script it really drives the tools, so a fresh install shows a whole ReAct loop: on a task's first
turn it asks for ``bash`` (when the task holds a ``$ command`` line or ``run: command``) or else for
``list_files``; on the next turn it answers from what the tool returned. With a script (``ALEX_MOCK_SCRIPT``,
a JSON file) it plays the scripted turns instead::

    {"turns": [
        {"text": "Listing.", "tool_calls": [{"name": "bash", "arguments": {"command": "ls"}}]},
        {"text": "Almost.", "delay_ms": 50},
        {"error": {"kind": "server", "message": "the model fell over"}}
    ]}

Either way the turn played is the number of assistant messages after the last user message, so every new task
starts over at turn 0, and the same conversation always gets the same answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import Settings
from service.domain.llm import ChatResponse, LLMError, Message, TextSink, ToolCall, ToolSpec, Usage

MOCK_MODEL = "mock"

ERROR_KINDS = frozenset({"timeout", "connection", "rate_limit", "auth", "bad_request", "server", "stream", "error"})
"""The kinds a scripted error may take: the same bounded set the OpenAI adapter raises."""

_TOKEN = re.compile(r"\s*\S+|\s+")
# With no delay the stream still hands the loop back now and then, so a long answer cannot starve other tasks.
_YIELD_EVERY = 16
_QUOTE_LIMIT = 500
_LISTED_ENTRIES = 20
_COMMAND_LINE = re.compile(r"^\s*\$ (?P<command>.+)$", re.MULTILINE)
_RUN_PHRASE = re.compile(r"\brun:\s*(?P<command>[^\n]+)", re.IGNORECASE)
_BACKTICKED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True, slots=True)
class ScriptedCall:
    name: str
    arguments: str
    """The raw argument text, as a model would send it (a script may give an object or a string)."""


@dataclass(frozen=True, slots=True)
class ScriptedError:
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class ScriptedTurn:
    """One scripted turn: its text streams first, then it asks for its tool calls or raises its error."""

    text: str = ""
    tool_calls: tuple[ScriptedCall, ...] = ()
    delay_ms: float | None = None
    error: ScriptedError | None = None


@dataclass(frozen=True, slots=True)
class MockScript:
    turns: tuple[ScriptedTurn, ...]

    @classmethod
    def load(cls, path: Path) -> MockScript:
        """Read and check a script file; raises :class:`ValueError` naming the file and the problem."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"mock script {path}: cannot be read ({exc.strerror or exc})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"mock script {path}: not valid JSON ({exc})") from None
        return cls.parse(data, source=f"mock script {path}")

    @classmethod
    def parse(cls, data: Any, *, source: str = "mock script") -> MockScript:
        """Check a script: ``{"turns": [...]}`` or the list of turns itself; raises :class:`ValueError`."""
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - {"turns"})
            if unknown:
                raise ValueError(f"{source}: unknown key {unknown[0]!r} (expected only 'turns')")
            data = data.get("turns")
        if not isinstance(data, list):
            raise ValueError(f'{source}: expected {{"turns": [...]}} with a list of turns')
        return cls(tuple(_parse_turn(turn, f"{source}: turns[{index}]") for index, turn in enumerate(data)))


def _parse_turn(data: Any, where: str) -> ScriptedTurn:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(data) - {"text", "tool_calls", "delay_ms", "error"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    text = data.get("text", "")
    if not isinstance(text, str):
        raise ValueError(f"{where}.text must be a string")
    delay = data.get("delay_ms")
    if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0):
        raise ValueError(f"{where}.delay_ms must be a number of milliseconds, 0 or more")
    calls = data.get("tool_calls", [])
    if not isinstance(calls, list):
        raise ValueError(f"{where}.tool_calls must be a list")
    error = data.get("error")
    if error is not None and calls:
        raise ValueError(f"{where}: a turn has either tool_calls or an error, not both")
    return ScriptedTurn(
        text=text,
        tool_calls=tuple(_parse_call(call, f"{where}.tool_calls[{n}]") for n, call in enumerate(calls)),
        delay_ms=None if delay is None else float(delay),
        error=None if error is None else _parse_error(error, f"{where}.error"),
    )


def _parse_call(data: Any, where: str) -> ScriptedCall:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(data) - {"name", "arguments"})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name must be a non-empty string")
    arguments = data.get("arguments", {})
    if isinstance(arguments, Mapping):
        return ScriptedCall(name, json.dumps(arguments))
    if isinstance(arguments, str):
        # A string goes out verbatim, so a script can also play a model that sends broken JSON.
        return ScriptedCall(name, arguments)
    raise ValueError(f"{where}.arguments must be an object or a string")


def _parse_error(data: Any, where: str) -> ScriptedError:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object")
    kind = data.get("kind", "error")
    if kind not in ERROR_KINDS:
        raise ValueError(f"{where}.kind must be one of {', '.join(sorted(ERROR_KINDS))}")
    message = data.get("message", "scripted model error")
    if not isinstance(message, str):
        raise ValueError(f"{where}.message must be a string")
    return ScriptedError(kind=kind, message=message)


class MockChatModel:
    """A :class:`~service.domain.llm.ChatModel` that answers from a script, or from the conversation itself.

    Text streams through ``on_text`` a word at a time (each piece carries the whitespace before its word, so
    the pieces join to the exact text), ``delay_ms`` apart. Tool call ids are ``call_<turn>_<n>``. Usage is
    estimated from the characters (about four a token), so it is stable too. Past the script's last turn it
    answers "Done.". A scripted error turn streams its text, then raises :class:`LLMError` of its kind.
    """

    def __init__(
        self, *, delay_ms: float = 0.0, script: MockScript | Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must be 0 or more")
        self._delay_ms = delay_ms
        if script is None or isinstance(script, MockScript):
            self._script = script
        else:
            self._script = MockScript.parse(list(script))

    @classmethod
    def from_settings(cls, settings: Settings) -> MockChatModel:
        """Raises :class:`ValueError` when ``settings.mock_script`` names a missing or malformed file."""
        script = MockScript.load(settings.mock_script) if settings.mock_script is not None else None
        return cls(delay_ms=settings.mock_delay_ms, script=script)

    @property
    def model(self) -> str:
        return MOCK_MODEL

    async def aclose(self) -> None:
        """Nothing to release; present so every adapter closes the same way."""

    async def chat(self, messages: Sequence[Message], tools: Sequence[ToolSpec], on_text: TextSink) -> ChatResponse:
        turn_index = turn_of(messages)
        if self._script is None:
            turn = _default_turn(messages, tools, turn_index)
        elif turn_index < len(self._script.turns):
            turn = self._script.turns[turn_index]
        else:
            turn = ScriptedTurn(text="Done.")
        delay_ms = self._delay_ms if turn.delay_ms is None else turn.delay_ms
        started = time.monotonic()
        # Even a turn without text hands the loop back once, so a cancelled task stops here like with a real model.
        await asyncio.sleep(0)
        first_chunk = await _stream(turn.text, delay_ms, on_text)
        if turn.error is not None:
            raise LLMError(turn.error.message, kind=turn.error.kind)
        calls = tuple(
            ToolCall(id=f"call_{turn_index}_{n}", name=call.name, arguments=call.arguments)
            for n, call in enumerate(turn.tool_calls)
        )
        prompt = sum(len(message.content) + sum(len(c.arguments) for c in message.tool_calls) for message in messages)
        completion = len(turn.text) + sum(len(call.arguments) for call in calls)
        return ChatResponse(
            content=turn.text,
            tool_calls=calls,
            usage=Usage(prompt_tokens=prompt // 4 + 1, completion_tokens=completion // 4 + 1),
            finish_reason="tool_calls" if calls else "stop",
            model=MOCK_MODEL,
            first_chunk_seconds=(first_chunk if first_chunk is not None else time.monotonic()) - started,
        )


def tokens(text: str) -> list[str]:
    """``text`` cut into words, each with the whitespace before it; ``"".join(tokens(text)) == text``."""
    return _TOKEN.findall(text)


def turn_of(messages: Sequence[Message]) -> int:
    """How many assistant messages follow the last user message: 0 on a task's first turn."""
    turn = 0
    for message in reversed(messages):
        if message.role == "user":
            break
        if message.role == "assistant":
            turn += 1
    return turn


async def _stream(text: str, delay_ms: float, on_text: TextSink) -> float | None:
    """Hand ``text`` to ``on_text`` a word at a time; returns when (``time.monotonic``) the first word went out."""
    first: float | None = None
    for n, token in enumerate(tokens(text)):
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        elif n % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)
        if first is None:
            first = time.monotonic()
        await on_text(token)
    return first


def _default_turn(messages: Sequence[Message], tools: Sequence[ToolSpec], turn_index: int) -> ScriptedTurn:
    task = next((m.content for m in reversed(messages) if m.role == "user"), "")
    offered = {tool.name for tool in tools}
    if turn_index == 0:
        command = _command_in(task)
        if command is not None and "bash" in offered:
            return ScriptedTurn(
                text=f"I'll run `{command}`.",
                tool_calls=(ScriptedCall("bash", json.dumps({"command": command})),),
            )
        if "list_files" in offered:
            return ScriptedTurn(
                text="Let me look at the workspace first.",
                tool_calls=(ScriptedCall("list_files", json.dumps({"path": "."})),),
            )
        return ScriptedTurn(text=f"{_echo(task)} I have no tools to look further, so this is all I can say.")
    return ScriptedTurn(text=f"{_echo(task)} {_report(messages)}")


def _command_in(task: str) -> str | None:
    for pattern in (_COMMAND_LINE, _RUN_PHRASE):
        match = pattern.search(task)
        if match:
            command = match.group("command").strip()
            quoted = _BACKTICKED.match(command)
            command = (quoted.group(1) if quoted else command).strip()
            if command:
                return command
    return None


def _echo(task: str) -> str:
    first_line = next((line.strip() for line in task.splitlines() if line.strip()), "")
    return f'You asked: "{_shorten(first_line, 80)}".' if first_line else "You asked nothing in particular."


def _report(messages: Sequence[Message]) -> str:
    """One sentence on what the last tool said, found after the last assistant message."""
    results: list[Message] = []
    calls: dict[str, str] = {}
    for message in reversed(messages):
        if message.role == "tool":
            results.append(message)
        elif message.role == "assistant":
            calls = {call.id: call.name for call in message.tool_calls}
            break
        else:
            break
    if not results:
        return "There was nothing more to look at."
    last = results[0]
    name = last.name or calls.get(last.tool_call_id or "", "")
    if name == "list_files":
        return _describe_listing(last.content)
    if name == "bash":
        output = last.content.strip()
        return f"The command printed:\n{_shorten(output, _QUOTE_LIMIT)}" if output else "The command printed nothing."
    return f"The tool {name or 'I called'} returned:\n{_shorten(last.content.strip(), _QUOTE_LIMIT)}"


def _describe_listing(content: str) -> str:
    entries = _entries(content)
    if not entries:
        return "The workspace is empty."
    shown = ", ".join(entries[:_LISTED_ENTRIES])
    more = f" and {len(entries) - _LISTED_ENTRIES} more" if len(entries) > _LISTED_ENTRIES else ""
    noun = "entry" if len(entries) == 1 else "entries"
    return f"The workspace holds {len(entries)} {noun}: {shown}{more}."


def _entries(content: str) -> list[str]:
    """The names in a listing, whether the tool answered with JSON or with one entry a line."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, Mapping):
        data = data.get("entries", data.get("files"))
    if isinstance(data, list):
        names = [item.get("name", item.get("path")) if isinstance(item, Mapping) else item for item in data]
        return [str(name) for name in names if name is not None]
    return [line.strip() for line in content.splitlines() if line.strip()]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
