"""``GET /api/sse``: one session's events as Server-Sent Events, resumable with ``Last-Event-ID``.

The stream sends ``connected``, then the stored events after the client's last id, then live ones, with a
``: ping`` comment every ``ALEX_SSE_HEARTBEAT_SECONDS``. A client that falls ``ALEX_SSE_BUFFER_SIZE`` events
behind loses its pending events and its stream; it gets them back by reconnecting with ``Last-Event-ID``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Annotated, Protocol, TypeVar

import structlog
from fastapi import APIRouter, Header, Query, Request
from starlette.datastructures import State

from service.api.deps import SessionReader, container_of
from service.api.problems import ApiError, problem_responses
from service.api.sse import STALLED, EventStreamResponse, WritePacer
from service.api.telemetry import request_started
from service.app.access import Principal
from service.app.ports import STORE_UNAVAILABLE
from service.app.sessions import SessionService, StreamsFull
from service.app.stream import SessionFeed
from service.container import Container
from service.domain.errors import LimitExceeded
from service.domain.events import StoredEvent, connected_frame
from service.observability.metrics import SSE_CLOSE_REASONS, Metrics

T = TypeVar("T")

router = APIRouter(tags=["stream"])
log = structlog.get_logger("service.sse")

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SEND_TIMEOUT_FACTOR = 2
"""A client that takes this many heartbeat intervals to accept one write is gone; its connection is dropped."""
CLIENT_GONE = "client_gone"
_SERVER_REASONS = frozenset({"slow_client", "draining", "session_deleted", "redis_unavailable", STORE_UNAVAILABLE})


class SessionStreamResponse(EventStreamResponse):
    """The event stream of one session (see :class:`~service.api.sse.EventStreamResponse`)."""


class FrameRenderer(Protocol):
    """Another rendering of the same feed (the web UI's HTML); without one, a stream writes the stored frames.

    Whatever the rendering, the events, their ids, their order and the resume after ``Last-Event-ID`` are the
    feed's: a renderer only decides the bytes of each frame.
    """

    def opening(self) -> bytes:
        """The first write, before any event (the ``connected`` frame)."""

    async def render(self, batch: Sequence[StoredEvent]) -> bytes:
        """One write: a frame per event, in order, each with the event's ``id:`` and ``event:`` lines."""

    def closing(self, feed: SessionFeed) -> bytes | None:
        """A last frame, without an id, once the feed has ended (``feed.close_reason`` says why); or None."""


class SentTally:
    """The account of the frames every stream of the application writes, kept in plain numbers as they go out and
    added to the metrics once per turn of the event loop.

    A live event often goes out on many streams in one turn (every subscriber of its session, from the publisher's
    turn): the broker then reports it once with the number of streams (:meth:`wrote`). Its frame's bytes and its
    type are counted once per stream, as the metrics say, but the delivery latency gets one sample per event and
    turn, since every stream wrote it at the same moment. A write of several events gives one sample, of its oldest.
    The account is due at the end of the turn it was made in, well before anyone scrapes it.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._bytes = 0
        self._by_type: dict[str, int] = {}
        self._appended: dict[int, float] = {}
        self._due = False
        self.account: Callable[[StoredEvent, int], None] = self.wrote
        """:meth:`wrote`, as one object that every stream hands its feed: the broker then finds the streams of an
        event sharing it at the first comparison, and a delivery touches one object less of its own."""

    def wrote(self, event: StoredEvent, streams: int = 1) -> None:
        """``event``'s frame alone went out on ``streams`` streams."""
        self.add(event, len(event.frame) * streams, streams)

    def add(self, oldest: StoredEvent, size: int, writes: int = 1) -> None:
        """``writes`` writes of ``size`` bytes in all, each with ``oldest`` as its oldest event (the caller counts
        the other events' types with :meth:`count`)."""
        self._bytes += size
        by_type = self._by_type
        by_type[oldest.event_type] = by_type.get(oldest.event_type, 0) + writes
        if oldest.appended_at:
            self._appended[oldest.id] = oldest.appended_at
        if not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self.settle)

    def count(self, event_type: str, count: int) -> None:
        """More events of one write, besides its oldest."""
        self._by_type[event_type] = self._by_type.get(event_type, 0) + count

    def settle(self) -> None:
        """Add what was counted to the metrics."""
        self._due = False
        metrics = self._metrics
        now = time.time()
        if self._appended:
            metrics.sse_delivery_latency.observe_many([max(0.0, now - appended)
                                                       for appended in self._appended.values()])
        metrics.sse_bytes_sent.inc(self._bytes)
        for event_type, count in self._by_type.items():
            metrics.count_sent(event_type, count)
        self._bytes = 0
        self._by_type = {}
        self._appended = {}


class _Stream:
    """One client's stream (a :class:`~service.api.sse.FrameSource`): its writes, and the account of it (metrics
    and one log line) when it ends."""

    def __init__(self, sessions: SessionService, principal: Principal, feed: SessionFeed, session_id: str,
                 metrics: Metrics, tally: SentTally, arrived: float, renderer: FrameRenderer | None = None) -> None:
        self._sessions = sessions
        self._tally = tally
        self._principal = principal
        self._feed = feed
        self._session_id = session_id
        self._metrics = metrics
        self._arrived = arrived
        self._renderer = renderer
        self._opened = time.monotonic()
        self._batch: list[StoredEvent] = []
        self._size = 0
        self._events = 0
        self._waited = 0.0
        self._rendering = False
        self._finished = False
        metrics.sse_connections_opened.inc()
        metrics.sse_connections_active.inc()

    def opening(self) -> bytes:
        return connected_frame(self._session_id) if self._renderer is None else self._renderer.opening()

    def opened(self) -> None:
        self._metrics.sse_time_to_first_event.observe(time.monotonic() - self._arrived)

    @property
    def interruptible(self) -> bool:
        # Not while a renderer works on a batch already taken from the feed: cancelling then would lose it.
        return self._feed.live and not self._rendering

    async def next_write(self) -> bytes | None:
        batch = await self._feed.next()
        if not batch:
            return None
        if self._renderer is not None:
            self._rendering = True
            try:
                frame = await self._renderer.render(batch)
            finally:
                self._rendering = False
        else:
            frame = batch[0].frame if len(batch) == 1 else b"".join([event.frame for event in batch])
        self._batch = batch
        self._events = len(batch)
        self._size = len(frame)
        appended = batch[0].appended_at
        self._waited = time.time() - appended if appended else 0.0
        return frame

    @property
    def waited(self) -> float:
        return self._waited

    @property
    def events(self) -> int:
        return self._events

    def written(self) -> None:
        batch = self._batch
        self._batch = []
        self._tally.add(batch[0], self._size)
        if len(batch) > 1:
            counts = Counter([event.event_type for event in batch])
            counts[batch[0].event_type] -= 1
            for event_type, count in counts.items():
                if count:
                    self._tally.count(event_type, count)

    def closing(self) -> bytes | None:
        last = self._renderer.closing(self._feed) if self._renderer is not None else None
        if last is not None:
            self._metrics.sse_bytes_sent.inc(len(last))
        return last

    def notify_when_filling(self, callback: Callable[[], None]) -> None:
        self._feed.notify_when_filling(callback)

    def write_through(self, write: Callable[[bytes], bool]) -> None:
        if self._renderer is None:  # a renderer may wait for its frame: it takes the writer's own turn
            self._feed.write_through(write, self._tally.account)

    def gone(self) -> None:
        self._feed.close(CLIENT_GONE)

    def finish(self, reason: str | None = None) -> None:
        """Give the stream's place back and account for it; the first call counts, later ones do nothing."""
        if self._finished:
            return
        self._finished = True
        feed, metrics = self._feed, self._metrics
        lost = feed.pending + len(self._batch) if reason == STALLED else 0
        # The server's own reason to end the feed comes first: a client cut off as slow usually stalls the last
        # write too, but being slow is why it ended.
        if feed.close_reason in _SERVER_REASONS:
            reason = feed.close_reason
        reason = reason or feed.close_reason or CLIENT_GONE
        if reason not in SSE_CLOSE_REASONS:
            reason = CLIENT_GONE
        feed.close(CLIENT_GONE)
        self._sessions.unfollow(self._principal, feed)
        seconds = time.monotonic() - self._opened
        metrics.sse_connections_active.dec()
        metrics.sse_connections_closed.labels(reason).inc()
        metrics.sse_connection_duration.observe(seconds)
        if feed.dropped:
            metrics.sse_events_dropped.labels("slow_client").inc(feed.dropped)
        if lost:
            metrics.sse_events_dropped.labels(STALLED).inc(lost)
        log.info("sse_stream_closed", session_id=self._session_id, reason=reason, replayed=feed.replayed,
                 delivered=feed.delivered, dropped=feed.dropped + lost, last_event_id=feed.last_id,
                 seconds=round(seconds, 3))


def parse_last_event_id(header: str | None, query: str | None) -> int:
    raw = header if header not in (None, "") else query
    if raw in (None, ""):
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "Last-Event-ID must be an event id this server sent") from None
    if value < 0:
        raise ApiError(400, "Last-Event-ID must be an event id this server sent")
    return value


@router.get(
    "/api/sse",
    response_class=SessionStreamResponse,
    status_code=200,
    responses={200: {"content": {"text/event-stream": {}}}, **problem_responses(400, 404, 503)},
)
async def stream_events(
    request: Request,
    principal: SessionReader,
    session_id: Annotated[str, Query(pattern=r"^[A-Za-z0-9._-]{1,128}$")],
    last_event_id: Annotated[str | None, Query(description="Resume after this id (EventSource cannot set "
                                                           "the Last-Event-ID header on a first connect).")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> SessionStreamResponse:
    """Follow a session's events. The session is created for the caller when the id is free."""
    after = parse_last_event_id(last_event_id_header, last_event_id)
    container = container_of(request)
    return await open_stream(request, principal, container.sessions, container, session_id, after)


async def open_stream(request: Request, principal: Principal, sessions: SessionService, container: Container,
                      session_id: str, after: int, renderer: FrameRenderer | None = None) -> SessionStreamResponse:
    """The session's stream after ``after`` for an authorised caller: the one way every stream opens (its caps,
    metrics and log lines), whichever ``renderer`` writes its frames (None: the stored JSON frames)."""
    structlog.contextvars.bind_contextvars(session_id=session_id)
    metrics = container.metrics
    try:
        feed = await sessions.follow(principal, session_id, after)
    except LimitExceeded:
        metrics.sse_connections_rejected.labels("client_cap").inc()
        raise
    except StreamsFull:
        metrics.sse_connections_rejected.labels("server_cap").inc()
        raise
    log.info("sse_stream_opened", session_id=session_id, last_event_id=after)
    heartbeat = container.settings.sse_heartbeat_seconds
    state = request.app.state
    stream = _Stream(sessions, principal, feed, session_id, metrics, _shared(state, "sent_tally", SentTally, metrics),
                     request_started(request.scope), renderer)
    return SessionStreamResponse(stream, heartbeat=heartbeat, send_timeout=heartbeat * SEND_TIMEOUT_FACTOR,
                                 pacer=_shared(state, "write_pacer", WritePacer), headers=STREAM_HEADERS)


def _shared(state: State, name: str, make: Callable[..., T], *args: object) -> T:
    """The application's one ``make(*args)`` under ``name``, made by its first stream (every stream shares it)."""
    value: T | None = getattr(state, name, None)
    if value is None:
        value = make(*args)
        setattr(state, name, value)
    return value
