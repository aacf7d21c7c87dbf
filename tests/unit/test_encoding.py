"""The fast encodings agree with their references: orjson with the standard library's JSON, the cached second
with ``isoformat``, in any order of calls."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.adapters.jsoncodec import dumps, dumps_text
from service.adapters.store.sqlite import from_db_time, to_db_time
from service.domain.events import (
    StoredEvent,
    ToolCallStart,
    encode_json,
    encode_json_bytes,
    format_timestamp,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_the_fast_encoder_writes_the_same_json_value(value: Any) -> None:
    fast = dumps(value)
    assert json.loads(fast) == json.loads(encode_json_bytes(value))
    assert dumps_text(value) == fast.decode()
    assert b"\n" not in fast  # an SSE data line holds the whole object


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_text_is_written_as_is_not_escaped(text: str) -> None:
    # ensure_ascii=False in the reference: strings go out in UTF-8, only JSON's own escapes applied.
    assert dumps(text) == encode_json_bytes(text)


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize("value", [
    {"big": 2**70},                     # beyond 64 bits: orjson refuses, the reference writes it
    {1: "one", None: "none"},           # keys that are not strings: the reference turns them into strings
    {"when": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)},  # str(it), not orjson's RFC 3339 form
    {"point": Point(3)},                # str(it), not orjson's object form
    {"set": {1}},                       # neither knows a set: str(it)
    ("a", 1),                           # a tuple is a list
])
def test_what_orjson_would_write_otherwise_is_written_as_the_reference_writes_it(value: Any) -> None:
    assert dumps(value) == encode_json_bytes(value)
    assert dumps_text(value) == encode_json(value)


def test_nan_and_infinities_become_null_where_the_reference_writes_invalid_json() -> None:
    assert json.loads(dumps([math.nan, math.inf, -math.inf])) == [None, None, None]
    assert encode_json([math.nan]) == "[NaN]"


def test_a_lone_surrogate_gets_the_reference_answer() -> None:
    assert dumps_text({"s": "\ud800"}) == encode_json({"s": "\ud800"})
    with pytest.raises(UnicodeEncodeError):
        dumps({"s": "\ud800"})  # as the reference's bytes: not UTF-8


def test_an_event_encoded_fast_is_the_event_encoded_by_the_reference() -> None:
    event = ToolCallStart(session_id="s", task_id="t", iteration=2, tool_name="bash", call_id="c",
                          arguments={"command": "ls -la", "timeout": 5, "note": "déjà vu \u2028"})
    fast, reference = StoredEvent.encode(7, event, dumps), StoredEvent.encode(7, event)
    assert json.loads(fast.data) == json.loads(reference.data)
    assert fast.frame == f"id: 7\nevent: tool_call_start\ndata: {fast.data}\n\n".encode()
    assert (fast.id, fast.session_id, fast.task_id, fast.event_type) == (7, "s", "t", "tool_call_start")


zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30)),
                         timezone(timedelta(seconds=-1, microseconds=250)), None])
moments = st.builds(lambda moment, zone: moment.replace(tzinfo=zone),
                    st.datetimes(min_value=datetime(1901, 1, 2), max_value=datetime(9998, 12, 30)), zones)


def reference_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@settings(max_examples=500, deadline=None)
@given(st.lists(moments, min_size=1, max_size=8))
def test_times_format_as_isoformat_would_whatever_came_before(sequence: list[datetime]) -> None:
    # Each call may hit or miss the cached second: every order must give the reference text.
    for moment in sequence:
        utc = reference_utc(moment)
        expected = utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert format_timestamp(moment) == expected
        assert to_db_time(moment) == utc.isoformat(timespec="microseconds")
        assert from_db_time(to_db_time(moment)) == utc
        assert format_timestamp(moment) == expected, "the same moment again (an event's row after its JSON)"


def test_two_moments_of_one_second_in_two_zones_share_nothing_but_the_second() -> None:
    first = datetime(2025, 10, 2, 10, 0, 0, 1000, tzinfo=UTC)
    second = datetime(2025, 10, 2, 12, 0, 0, 2000, tzinfo=timezone(timedelta(hours=2)))
    third = datetime(2025, 10, 2, 10, 0, 1, 3000, tzinfo=UTC)
    assert [format_timestamp(m) for m in (first, second, third, first)] == [
        "2025-10-02T10:00:00.001Z", "2025-10-02T10:00:00.002Z", "2025-10-02T10:00:01.003Z",
        "2025-10-02T10:00:00.001Z"]
