"""A session's events as HTML: one template per event type, autoescaped, written as the frames of an event stream.

The UI's stream is a second rendering of the same feed as ``/api/sse`` (see ``FrameRenderer`` in
``service.api.routes.stream``): the same events, ids, order and resume after ``Last-Event-ID``. Each event becomes
one SSE frame (``id:``, ``event:``, then one ``data:`` line per line of HTML) whose HTML is made only of htmx
out-of-band swaps: the task's article the first time the stream meets a task, then each event into its task,
iteration or tool call. htmx applies out-of-band swaps in document order, so an article opened in a frame is there
for the swaps after it in the same frame.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import structlog
from jinja2 import Environment, PackageLoader

from service.app.stream import SessionFeed
from service.domain.events import EVENT_TYPES, TERMINAL_EVENT_TYPES, StoredEvent, connected_frame

log = structlog.get_logger("service.web")

EVENT_TEMPLATES: Mapping[str, str] = {kind.event_type: f"events/{kind.event_type}.html" for kind in EVENT_TYPES}
"""The one mapping from an event type to its template. A type missing here renders with ``UNKNOWN_TEMPLATE``."""
UNKNOWN_TEMPLATE = "events/_unknown.html"
TASK_TEMPLATE = "events/_task.html"
RUN_STATE_TEMPLATE = "_run_state.html"
NOTICE_TEMPLATE = "_notice.html"

NOTICE = "notice"
"""The event name of the frames (without an id) that tell the page about its stream, not about the session."""
CLOSED = "closed"
"""The event name of a last frame after which the page must not reconnect (the session is gone)."""
SWAPPED_EVENTS = ",".join([*EVENT_TEMPLATES, NOTICE, CLOSED])
"""What the page's timeline listens for (its ``sse-swap``): every event type, and the stream's own notices."""
RETRY_MS = 1000
"""The stream's ``retry:``: how long EventSource waits before reconnecting (browsers default to about 3 s)."""
BRIEF_CHARS = 120

# The SSE line ends. str.splitlines would also split on \x0b, \x1c, \u2028... which SSE keeps inside a line.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def dom_id(prefix: str, *parts: object) -> str:
    """A DOM id for a task, iteration, tool call or session: safe in a CSS selector whatever the ids hold (a model
    picks its tool-call ids), and the same in every rendering of the session."""
    digest = hashlib.blake2s("\x1f".join(str(part) for part in parts).encode(), digest_size=8).hexdigest()
    return f"{prefix}-{digest}"


def sse_frame(event_type: str, html: str, event_id: int | None = None) -> bytes:
    """One SSE frame carrying ``html``; a newline inside it starts another ``data:`` line (joined back by the
    browser), so the HTML arrives as rendered."""
    head = f"id: {event_id}\nevent: {event_type}\n" if event_id is not None else f"event: {event_type}\n"
    body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(html))
    return (head + body + "\n").encode()


def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _brief(arguments: Any) -> str:
    """A tool call's arguments on one line: a bash command or a path as it is, anything else as compact JSON."""
    if isinstance(arguments, Mapping):
        for key in ("command", "path", "pattern"):
            if isinstance(arguments.get(key), str):
                text = str(arguments[key])
                break
        else:
            text = json.dumps(arguments, ensure_ascii=False, default=str)
    else:
        text = str(arguments)
    text = " ".join(text.split())
    return text if len(text) <= BRIEF_CHARS else text[: BRIEF_CHARS - 1] + "…"


def _clock(timestamp: Any) -> str:
    """``HH:MM:SS`` (UTC) of an RFC 3339 timestamp as the events carry them."""
    text = str(timestamp or "")
    return text[11:19] if len(text) >= 19 else text


class Templates:
    """The UI's Jinja2 templates, all autoescaped: every value from an event, a task or a form is text, never
    markup (an event carrying ``<script>`` shows those characters)."""

    def __init__(self) -> None:
        # Templates ship inside the package and never change while the server runs: no reload checks.
        self._env = Environment(loader=PackageLoader("service.web", "templates"), autoescape=True,
                                auto_reload=False, trim_blocks=True, lstrip_blocks=True)
        self._env.globals.update(
            task_dom=lambda task_id: dom_id("t", task_id),
            iteration_dom=lambda task_id, iteration: dom_id("i", task_id, iteration),
            call_dom=lambda task_id, call_id: dom_id("c", task_id, call_id),
            session_dom=lambda session_id: dom_id("s", session_id),
            event_names=SWAPPED_EVENTS,
        )
        self._env.filters.update(pretty_json=_pretty_json, brief=_brief, clock=_clock)

    def render(self, name: str, **context: Any) -> str:
        return self._env.get_template(name).render(**context)


class TaskLookup(Protocol):
    """What the renderer asks about the session it renders, with the reader's rights."""

    async def task_text(self, task_id: str) -> str | None:
        """The task's text as submitted; None when the reader may not see it (or it is gone)."""

    async def task_at(self, event_id: int) -> str | None:
        """The task of the session's stored event ``event_id``; None when there is no such event."""


class HtmlFrames:
    """The web UI's :class:`~service.api.routes.stream.FrameRenderer`: one stream's events as HTML fragments.

    It remembers which tasks this stream has opened an article for. A stream that resumes after an event starts
    knowing that event's task: the page already holds its article (a session runs one task at a time, so the
    other tasks before that event are complete on the page as well).
    """

    def __init__(self, templates: Templates, lookup: TaskLookup, session_id: str, after: int) -> None:
        self._templates = templates
        self._lookup = lookup
        self._session_id = session_id
        self._after = after
        self._opened: set[str] = set()
        self._primed = after == 0

    def opening(self) -> bytes:
        frame = f"retry: {RETRY_MS}\n".encode() + connected_frame(self._session_id)
        if self._after:
            frame += sse_frame(NOTICE, self._templates.render(NOTICE_TEMPLATE, kind="resumed", after=self._after))
        return frame

    async def render(self, batch: Sequence[StoredEvent]) -> bytes:
        if not self._primed:
            self._primed = True
            resumed = await self._lookup.task_at(self._after)
            if resumed is not None:
                self._opened.add(resumed)
        return b"".join([await self._frame(event) for event in batch])

    def closing(self, feed: SessionFeed) -> bytes | None:
        reason = feed.close_reason
        if reason == "session_deleted":
            return sse_frame(CLOSED, self._templates.render(NOTICE_TEMPLATE, kind=reason))
        if reason in ("slow_client", "draining"):
            html = self._templates.render(NOTICE_TEMPLATE, kind=reason, dropped=feed.dropped, last_id=feed.last_id)
            return sse_frame(NOTICE, html)
        return None

    async def _frame(self, event: StoredEvent) -> bytes:
        data = event.to_dict()
        parts: list[str] = []
        opens = event.task_id not in self._opened
        if opens:
            self._opened.add(event.task_id)
            text = await self._lookup.task_text(event.task_id)
            parts.append(self._render(TASK_TEMPLATE, data, text=text))
        parts.append(self._render(EVENT_TEMPLATES.get(event.event_type, UNKNOWN_TEMPLATE), data))
        if event.event_type in TERMINAL_EVENT_TYPES and not data.get("recoverable"):
            parts.append(self._templates.render(RUN_STATE_TEMPLATE, task_id=None, oob=True))
        elif opens:
            parts.append(self._templates.render(RUN_STATE_TEMPLATE, task_id=event.task_id, oob=True))
        return sse_frame(event.event_type, "".join(parts), event.id)

    def _render(self, name: str, event: dict[str, Any], **context: Any) -> str:
        try:
            return self._templates.render(name, e=event, **context)
        except Exception:
            # One odd stored event (an older shape, a bug in a template) must not end every UI stream of its
            # session: it shows as raw data, and the server logs why.
            log.exception("ui_render_failed", template=name, event_type=event.get("event_type"))
            return self._templates.render(UNKNOWN_TEMPLATE, e=event)
