"""The events a task emits, as frozen typed records, and their one wire encoding.

Every stored event carries the envelope (``event_type``, ``id``, ``session_id``, ``task_id``, ``timestamp``,
``iteration`` where one applies, ``trace_id``) and the fields of its type. The id is not part of the record: the
event log assigns it on append and returns a :class:`StoredEvent`, which holds the JSON and the SSE frame made once
for every reader.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, NamedTuple


def utc_now() -> datetime:
    return datetime.now(UTC)


_LAST_SECOND: list[tuple[tuple[int, ...], str]] = [((), "")]
"""The second last formatted and its text, as one tuple so that a thread reads both halves of the same one."""


def utc_parts(moment: datetime) -> tuple[str, int]:
    """``moment`` in UTC (naive means UTC) as ``YYYY-MM-DDTHH:MM:SS`` and its microseconds.

    Every stored event formats its time twice (on the wire and in storage), and events come many to a second:
    the text of the last second is kept, which makes a call about three times cheaper than ``isoformat``.
    """
    if moment.tzinfo is not UTC:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    second = (moment.second, moment.minute, moment.hour, moment.day, moment.month, moment.year)
    last = _LAST_SECOND[0]
    if last[0] != second:
        last = _LAST_SECOND[0] = (second, moment.replace(microsecond=0, tzinfo=None).isoformat(timespec="seconds"))
    return last[1], moment.microsecond


_MILLISECONDS = tuple(f".{n:03d}Z" for n in range(1000))


_LAST_STAMP: list[tuple[datetime | None, str]] = [(None, "")]
"""The time last formatted and its text: an event's is formatted for its JSON and again for its row."""


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as ``2025-10-02T10:00:00.123Z``. A naive time is taken as UTC."""
    last = _LAST_STAMP[0]
    if last[0] is moment:
        return last[1]
    second, micro = utc_parts(moment)
    text = second + _MILLISECONDS[micro // 1000]
    _LAST_STAMP[0] = (moment, text)
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """The envelope shared by every stored event; subclasses add the fields of their type."""

    event_type: ClassVar[str]
    _envelope: ClassVar[frozenset[str]] = frozenset({"session_id", "task_id", "timestamp", "trace_id", "iteration"})

    session_id: str
    task_id: str
    timestamp: datetime = field(default_factory=utc_now)
    trace_id: str = ""
    iteration: int | None = None

    def to_dict(self, event_id: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "event_type": self.event_type,
            "id": event_id,
            "session_id": self.session_id,
            "task_id": self.task_id,
            "timestamp": format_timestamp(self.timestamp),
            "trace_id": self.trace_id,
        }
        if self.iteration is not None:
            body["iteration"] = self.iteration
        for name in _own_fields(type(self)):
            body[name] = getattr(self, name)
        return body


_OWN_FIELDS: dict[type[Event], tuple[str, ...]] = {}


def _own_fields(event_type: type[Event]) -> tuple[str, ...]:
    """The fields of an event type beyond the envelope, in declaration order (looked up once per type)."""
    names = _OWN_FIELDS.get(event_type)
    if names is None:
        names = _OWN_FIELDS[event_type] = tuple(
            f.name for f in dataclasses.fields(event_type) if f.name not in Event._envelope)
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskAnalysis(Event):
    event_type: ClassVar[str] = "task_analysis"
    action_name: str
    goal: str


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationStart(Event):
    event_type: ClassVar[str] = "iteration_start"


@dataclass(frozen=True, slots=True, kw_only=True)
class Thinking(Event):
    event_type: ClassVar[str] = "thinking"
    delta: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ThinkComplete(Event):
    event_type: ClassVar[str] = "think_complete"
    content: str
    tool_calls: list[dict[str, str]]
    """Each as ``{"call_id": ..., "tool_name": ...}``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallStart(Event):
    event_type: ClassVar[str] = "tool_call_start"
    tool_name: str
    call_id: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallStream(Event):
    event_type: ClassVar[str] = "tool_call_stream"
    tool_name: str
    call_id: str
    chunk: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ToolCallComplete(Event):
    event_type: ClassVar[str] = "tool_call_complete"
    tool_name: str
    call_id: str
    result: str
    error: str | None
    duration: int
    """Milliseconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IterationComplete(Event):
    event_type: ClassVar[str] = "iteration_complete"
    tokens_used: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskComplete(Event):
    event_type: ClassVar[str] = "task_complete"
    final_answer: str
    total_iterations: int
    total_tokens: int
    duration: int
    """Milliseconds."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCancelled(Event):
    event_type: ClassVar[str] = "task_cancelled"
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorEvent(Event):
    event_type: ClassVar[str] = "error"
    error: str
    recoverable: bool


EVENT_TYPES: tuple[type[Event], ...] = (
    TaskAnalysis,
    IterationStart,
    Thinking,
    ThinkComplete,
    ToolCallStart,
    ToolCallStream,
    ToolCallComplete,
    IterationComplete,
    TaskComplete,
    TaskCancelled,
    ErrorEvent,
)
"""Every stored event type, in the order a task usually emits them."""

CONNECTED = "connected"
"""The first frame of every stream; not stored, carries no id."""

TERMINAL_EVENT_TYPES = frozenset({TaskComplete.event_type, TaskCancelled.event_type, ErrorEvent.event_type})


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
"""One encoder for every event: ``json.dumps`` with options builds a new one per call."""


def encode_json(value: Any) -> str:
    """``value`` as compact JSON text, anything JSON cannot hold as ``str(it)``: the wire encoding of events."""
    return _ENCODER.encode(value)


def encode_json_bytes(value: Any) -> bytes:
    """:func:`encode_json` in UTF-8; the reference for faster encoders (see :meth:`StoredEvent.encode`)."""
    return _ENCODER.encode(value).encode()


def connected_frame(session_id: str) -> bytes:
    return ("event: " + CONNECTED + "\ndata: " + encode_json({"session_id": session_id}) + "\n\n").encode()


class StoredEvent(NamedTuple):
    """An event with the id the log gave it, encoded once: its JSON and its SSE frame.

    ``data`` is the JSON object the clients see; ``frame`` is the whole SSE message (``id``, ``event``, ``data``)
    so that every subscriber writes the same bytes without encoding them again.

    A named tuple, so as frozen as the events: every append makes one, and a tuple is made in a third of the time a
    frozen dataclass takes (whose constructor sets each field through ``object.__setattr__``). Two are equal when
    everything but ``appended_at`` is.
    """

    id: int
    session_id: str
    task_id: str
    event_type: str
    data: str
    frame: bytes
    appended_at: float = 0.0
    """When it was appended (``time.time()``), for the delivery latency; 0 when read back from storage."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredEvent):
            return NotImplemented
        return self[:6] == other[:6]

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self[:6])

    @classmethod
    def encode(cls, event_id: int, event: Event, dumps: Callable[[Any], bytes] = encode_json_bytes) -> StoredEvent:
        """``event`` with its id, encoded by ``dumps``: any encoder that writes the JSON value
        :func:`encode_json_bytes` writes, in UTF-8 and on one line (the event logs pass a faster one)."""
        data = dumps(event.to_dict(str(event_id)))
        frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event.event_type.encode(), data)
        return cls(event_id, event.session_id, event.task_id, event.event_type, data.decode(), frame, time.time())

    @classmethod
    def from_json(cls, event_id: int, session_id: str, task_id: str, event_type: str, data: str, *,
                  appended_at: float = 0.0) -> StoredEvent:
        # JSON never holds a raw newline (it is escaped), so one data line carries the whole object.
        frame = f"id: {event_id}\nevent: {event_type}\ndata: {data}\n\n".encode()
        return cls(event_id, session_id, task_id, event_type, data, frame, appended_at)

    def to_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value
