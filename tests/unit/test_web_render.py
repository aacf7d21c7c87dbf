"""The web UI's HTML rendering of events, without a server: one template per type, escaping, the SSE frames, and
which task articles a stream opens (the browser's side is in tests/browser)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from service.adapters.broker.memory import MemoryBroker
from service.adapters.store.memory import MemoryEventLog
from service.app.stream import SessionFeed
from service.domain.events import EVENT_TYPES, Event, IterationStart, StoredEvent, TaskComplete, Thinking
from service.web.render import (
    EVENT_TEMPLATES,
    SWAPPED_EVENTS,
    HtmlFrames,
    Templates,
    dom_id,
    sse_frame,
)
from tests.unit.test_events import SAMPLES, make_event

HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


class FakeLookup:
    def __init__(self, texts: dict[str, str], at: dict[int, str] | None = None) -> None:
        self.texts = texts
        self.at = at or {}
        self.asked: list[str] = []

    async def task_text(self, task_id: str) -> str | None:
        self.asked.append(task_id)
        return self.texts.get(task_id)

    async def task_at(self, event_id: int) -> str | None:
        return self.at.get(event_id)


def stored(event_id: int, event: Event) -> StoredEvent:
    return StoredEvent.encode(event_id, event)


def frames(raw: bytes) -> list[dict[str, Any]]:
    """Each frame's fields; ``data`` lines joined with a newline, as a browser's EventSource does."""
    found: list[dict[str, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        fields: dict[str, Any] = {"data": []}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if name == "data":
                fields["data"].append(value)
            else:
                fields[name] = value
        fields["data"] = "\n".join(fields["data"])
        found.append(fields)
    return found


def test_every_event_type_has_its_template() -> None:
    assert set(EVENT_TEMPLATES) == {kind.event_type for kind in EVENT_TYPES}
    assert SWAPPED_EVENTS.split(",") == [*EVENT_TEMPLATES, "notice", "closed"]


@pytest.mark.parametrize(("kind", "fields"), SAMPLES, ids=[kind.event_type for kind, _ in SAMPLES])
async def test_each_event_renders_escaped_into_one_frame_with_its_id(kind: type[Event], fields: dict[str, Any]
                                                                     ) -> None:
    # Every text an event carries is hostile (the ids too: a model picks its tool-call ids).
    hostile: dict[str, Any] = {name: HOSTILE if isinstance(value, str) else value for name, value in fields.items()}
    renderer = HtmlFrames(Templates(), FakeLookup({"t_1": HOSTILE}), "abc123", 0)
    (frame,) = frames(await renderer.render([stored(7, make_event(kind, **hostile))]))
    assert (frame["id"], frame["event"]) == ("7", kind.event_type)
    assert "<script" not in frame["data"]
    assert "<img" not in frame["data"]
    assert "hx-swap-oob" in frame["data"], "every fragment is an out-of-band swap"


async def test_a_task_opens_its_article_once_and_its_end_frees_the_task_box() -> None:
    lookup = FakeLookup({"t_1": "list the files"})
    renderer = HtmlFrames(Templates(), lookup, "abc123", 0)
    raw = await renderer.render([stored(1, make_event(IterationStart)), stored(2, make_event(Thinking, delta="Hi"))])
    first, second = frames(raw)
    assert first["data"].startswith('<div hx-swap-oob="beforeend:#timeline">')
    assert "list the files" in first["data"]
    assert 'id="run-state" class="run-state" data-task="t_1"' in first["data"]
    assert "<article" not in second["data"]
    complete = make_event(TaskComplete, final_answer="Done.", total_iterations=1, total_tokens=9, duration=5)
    (done,) = frames(await renderer.render([stored(3, complete)]))
    assert 'data-task=""' in done["data"]
    assert lookup.asked == ["t_1"], "the task's text is looked up once per stream"


async def test_a_resumed_stream_does_not_open_the_task_the_page_already_shows() -> None:
    renderer = HtmlFrames(Templates(), FakeLookup({}, at={5: "t_1"}), "abc123", 5)
    opening = frames(renderer.opening())
    assert [f.get("event") for f in opening] == ["connected", "notice"]
    assert opening[0]["retry"] == "1000"
    assert "id" not in opening[1]
    assert "resumed after event 5" in opening[1]["data"]
    (frame,) = frames(await renderer.render([stored(6, make_event(IterationStart))]))
    assert "<article" not in frame["data"]


def test_html_keeps_its_line_ends_as_data_lines() -> None:
    raw = sse_frame("thinking", "a\nb\r\nc\rd\u2028e", 9)
    assert raw == b"id: 9\nevent: thinking\ndata: a\ndata: b\ndata: c\ndata: d\xe2\x80\xa8e\n\n"
    assert sse_frame("notice", "x") == b"event: notice\ndata: x\n\n"


def test_dom_ids_are_safe_selectors_whatever_the_ids_hold() -> None:
    made = dom_id("c", "t_1", 'call"]; <x>#1')
    assert re.fullmatch(r"c-[0-9a-f]{16}", made)
    assert made == dom_id("c", "t_1", 'call"]; <x>#1')
    assert made != dom_id("c", "t_1", "call_2")


@pytest.mark.parametrize(("reason", "event", "text"), [
    ("slow_client", "notice", "dropped"),
    ("draining", "notice", "shutting down"),
    ("session_deleted", "closed", "deleted"),
])
def test_a_feed_the_server_ended_gets_a_last_frame_without_an_id(reason: str, event: str, text: str) -> None:
    feed = SessionFeed(MemoryEventLog(MemoryBroker()), "abc123", 0, 10)
    feed.close(reason)
    (frame,) = frames(HtmlFrames(Templates(), FakeLookup({}), "abc123", 0).closing(feed) or b"")
    assert "id" not in frame
    assert frame["event"] == event
    assert text in frame["data"]


def test_a_client_that_left_gets_no_last_frame() -> None:
    feed = SessionFeed(MemoryEventLog(MemoryBroker()), "abc123", 0, 10)
    feed.close("client_gone")
    assert HtmlFrames(Templates(), FakeLookup({}), "abc123", 0).closing(feed) is None
