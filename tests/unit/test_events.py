"""Events on the wire: every type's JSON per API.md, the SSE frame, timestamps."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from service.domain.events import (
    EVENT_TYPES,
    TERMINAL_EVENT_TYPES,
    ErrorEvent,
    Event,
    IterationComplete,
    IterationStart,
    StoredEvent,
    TaskAnalysis,
    TaskCancelled,
    TaskComplete,
    ThinkComplete,
    Thinking,
    ToolCallComplete,
    ToolCallStart,
    ToolCallStream,
    connected_frame,
    format_timestamp,
)

MOMENT = datetime(2025, 10, 2, 10, 0, 0, 123456, tzinfo=UTC)
ENVELOPE = {"event_type", "id", "session_id", "task_id", "timestamp", "iteration", "trace_id"}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")

# Each type with the fields API.md gives it beyond the envelope.
SAMPLES: list[tuple[type[Event], dict[str, Any]]] = [
    (TaskAnalysis, {"action_name": "Analyzing task", "goal": "list the files"}),
    (IterationStart, {}),
    (Thinking, {"delta": "Let me"}),
    (ThinkComplete, {"content": "Let me look.", "tool_calls": [{"call_id": "call_1", "tool_name": "bash"}]}),
    (ToolCallStart, {"tool_name": "bash", "call_id": "call_1", "arguments": {"command": "ls -la"}}),
    (ToolCallStream, {"tool_name": "bash", "call_id": "call_1", "chunk": "a.txt\n"}),
    (ToolCallComplete, {"tool_name": "bash", "call_id": "call_1", "result": "a.txt\n", "error": None,
                        "duration": 12}),
    (IterationComplete, {"tokens_used": 120}),
    (TaskComplete, {"final_answer": "One file.", "total_iterations": 2, "total_tokens": 280, "duration": 1500}),
    (TaskCancelled, {"reason": "cancelled by the client"}),
    (ErrorEvent, {"error": "the model failed", "recoverable": False}),
]


def make_event(event_type: type[Event], iteration: int | None = 1, **fields: Any) -> Event:
    return event_type(session_id="abc123", task_id="t_1", trace_id="4bf9", timestamp=MOMENT, iteration=iteration,
                      **fields)


def test_the_samples_cover_every_event_type() -> None:
    assert {sample for sample, _ in SAMPLES} == set(EVENT_TYPES)
    names = [t.event_type for t in EVENT_TYPES]
    assert len(names) == len(set(names))
    assert set(TERMINAL_EVENT_TYPES) == {"task_complete", "task_cancelled", "error"}


@pytest.mark.parametrize(("event_type", "fields"), SAMPLES, ids=[t.event_type for t, _ in SAMPLES])
def test_to_dict_holds_the_envelope_and_the_fields_of_the_type(event_type: type[Event], fields: dict[str, Any]) -> None:
    body = make_event(event_type, iteration=3, **fields).to_dict("7")

    assert set(body) == ENVELOPE | set(fields)
    assert body["event_type"] == event_type.event_type
    assert body["id"] == "7"
    assert (body["session_id"], body["task_id"], body["trace_id"]) == ("abc123", "t_1", "4bf9")
    assert body["timestamp"] == "2025-10-02T10:00:00.123Z"
    assert body["iteration"] == 3
    assert {name: body[name] for name in fields} == fields


def test_iteration_is_left_out_where_none_applies() -> None:
    body = make_event(TaskCancelled, iteration=None, reason="stop").to_dict("1")
    assert "iteration" not in body
    assert set(body) == ENVELOPE - {"iteration"} | {"reason"}


def test_events_are_frozen() -> None:
    event = Thinking(session_id="s", task_id="t", delta="x")
    with pytest.raises(AttributeError):
        event.delta = "y"  # type: ignore[misc]


def test_encode_makes_the_json_and_the_frame_once() -> None:
    event = make_event(ToolCallStart, tool_name="bash", call_id="call_1", arguments={"command": "ls -la"})

    stored = StoredEvent.encode(7, event)

    assert (stored.id, stored.session_id, stored.task_id, stored.event_type) == (7, "abc123", "t_1", "tool_call_start")
    data = json.loads(stored.data)
    assert data == event.to_dict("7")
    assert data["id"] == "7"
    assert stored.to_dict() == data
    assert stored.frame == f"id: 7\nevent: tool_call_start\ndata: {stored.data}\n\n".encode()


def parse_frame(frame: bytes) -> dict[str, str]:
    """An SSE message's fields, split on LF only (what EventSource does; ``str.splitlines`` splits on more)."""
    text = frame.decode()
    assert text.endswith("\n\n")
    fields: dict[str, str] = {}
    for line in text[:-2].split("\n"):
        name, _, value = line.partition(": ")
        assert name not in fields, f"field {name} repeated: the payload spilled over lines"
        fields[name] = value
    return fields


def test_the_frame_parses_back_to_the_event() -> None:
    event = make_event(TaskComplete, final_answer="done", total_iterations=1, total_tokens=3, duration=4)
    fields = parse_frame(StoredEvent.encode(42, event).frame)
    assert set(fields) == {"id", "event", "data"}
    assert fields["id"] == "42"
    assert fields["event"] == "task_complete"
    assert json.loads(fields["data"]) == event.to_dict("42")


@pytest.mark.parametrize(
    "text",
    [
        "line one\nline two\r\nline three\rend",
        '</script><script>alert("x")</script>',
        "data: fake\n\nid: 999\nevent: task_complete\n",
        "unicode é 漢字 \u2028 \u2029 \x00 \t",
    ],
    ids=["newlines", "script", "injected-frame", "unicode"],
)
def test_any_payload_stays_on_one_data_line(text: str) -> None:
    event = make_event(ToolCallStream, tool_name="bash", call_id="call_1", chunk=text)

    stored = StoredEvent.encode(5, event)

    assert stored.frame.count(b"\n") == 4
    assert b"\r" not in stored.frame
    fields = parse_frame(stored.frame)
    assert fields["id"] == "5"
    assert json.loads(fields["data"])["chunk"] == text


def test_from_json_rebuilds_the_same_frame() -> None:
    stored = StoredEvent.encode(9, make_event(Thinking, delta="hi"))
    again = StoredEvent.from_json(9, stored.session_id, stored.task_id, stored.event_type, stored.data)
    assert again == stored


def test_the_connected_frame_has_no_id() -> None:
    frame = connected_frame("abc123")
    assert frame == b'event: connected\ndata: {"session_id":"abc123"}\n\n'
    assert "id" not in parse_frame(frame)


def test_timestamps_are_utc_with_milliseconds() -> None:
    assert format_timestamp(MOMENT) == "2025-10-02T10:00:00.123Z"
    assert format_timestamp(datetime(2025, 1, 1, tzinfo=UTC)) == "2025-01-01T00:00:00.000Z"
    assert format_timestamp(datetime(2025, 1, 1, 23, 59, 59, 999999, tzinfo=UTC)) == "2025-01-01T23:59:59.999Z"
    assert format_timestamp(datetime(2025, 10, 2, 10, 0, 0, 7000)) == "2025-10-02T10:00:00.007Z"  # naive is UTC
    paris = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2025, 10, 2, 12, 0, 0, 5000, tzinfo=paris)) == "2025-10-02T10:00:00.005Z"


def test_a_new_event_is_stamped_now_in_utc() -> None:
    before = datetime.now(UTC)
    event = Thinking(session_id="s", task_id="t", delta="x")
    after = datetime.now(UTC)
    assert before <= event.timestamp <= after
    assert event.timestamp.utcoffset() == timedelta(0)
    assert TIMESTAMP.match(event.to_dict("1")["timestamp"])


def test_encoding_is_the_same_whatever_the_order_of_calls() -> None:
    """The field names are looked up once per type; two types encoded in turn keep their own fields."""
    started = ToolCallStart(session_id="s", task_id="t", iteration=1, tool_name="bash", call_id="c1",
                            arguments={"command": "ls"})
    delta = Thinking(session_id="s", task_id="t", iteration=1, delta="hi")
    for _ in range(2):
        assert set(StoredEvent.encode(1, started).to_dict()) == {
            "event_type", "id", "session_id", "task_id", "timestamp", "trace_id", "iteration", "tool_name", "call_id",
            "arguments"}
        assert set(StoredEvent.encode(2, delta).to_dict()) == {
            "event_type", "id", "session_id", "task_id", "timestamp", "trace_id", "iteration", "delta"}


@pytest.mark.parametrize(("moment", "text"), [
    (datetime(2025, 10, 2, 10, 0, 0, 123456, tzinfo=UTC), "2025-10-02T10:00:00.123Z"),
    (datetime(2025, 10, 2, 10, 0, 0), "2025-10-02T10:00:00.000Z"),
    (datetime(2025, 10, 2, 12, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2))), "2025-10-02T10:00:00.999Z"),
    (datetime(2025, 12, 31, 23, 59, 59, 1000, tzinfo=UTC), "2025-12-31T23:59:59.001Z"),
])
def test_timestamps_of_any_zone_come_out_in_utc(moment: datetime, text: str) -> None:
    assert format_timestamp(moment) == text
