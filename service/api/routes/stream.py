"""``GET /api/sse``: one session's events as Server-Sent Events, resumable with ``Last-Event-ID``.

The stream sends ``connected``, then the stored events after the client's last id, then live ones, with a
``: ping`` comment every ``ALEX_SSE_HEARTBEAT_SECONDS``. A client that falls ``ALEX_SSE_BUFFER_SIZE`` events
behind loses its pending events and its stream; it gets them back by reconnecting with ``Last-Event-ID``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from service.api.deps import DEFAULT_LIMIT, ContainerDep, SessionReader, SessionsDep
from service.api.problems import ApiError, problem_responses
from service.app.access import Principal
from service.app.sessions import SessionService
from service.app.stream import SessionFeed
from service.domain.events import connected_frame

router = APIRouter(tags=["stream"])
log = structlog.get_logger("service.sse")

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SEND_TIMEOUT_FACTOR = 2
"""A client that takes this many heartbeat intervals to accept one write is gone; its connection is dropped."""


class SessionStreamResponse(EventSourceResponse):
    """The event stream; a client that stops reading for good ends it quietly.

    Such a client has already been cut off (``slow_client``) or simply never reads again; sse-starlette's send
    timeout then raises, which is the expected end of that stream, not a server failure. The server drops the
    connection (uvicorn notes once that the response was left unfinished).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            log.info("sse_client_stalled", path=scope.get("path"))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping")


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


async def _frames(sessions: SessionService, principal: Principal, feed: SessionFeed, session_id: str,
                  ) -> AsyncIterator[bytes]:
    opened = time.monotonic()
    try:
        yield connected_frame(session_id)
        async for batch in feed.batches():
            yield b"".join(event.frame for event in batch) if len(batch) > 1 else batch[0].frame
    finally:
        sessions.unfollow(principal, feed)
        log.info("sse_stream_closed", session_id=session_id, reason=feed.close_reason or "client_gone",
                 replayed=feed.replayed, delivered=feed.delivered, dropped=feed.dropped,
                 last_event_id=feed.last_id, seconds=round(time.monotonic() - opened, 3))


@router.get(
    "/api/sse",
    response_class=SessionStreamResponse,
    dependencies=[DEFAULT_LIMIT],
    responses={200: {"content": {"text/event-stream": {}}}, **problem_responses(400, 404)},
)
async def stream_events(
    principal: SessionReader,
    sessions: SessionsDep,
    container: ContainerDep,
    session_id: Annotated[str, Query(pattern=r"^[A-Za-z0-9._-]{1,128}$")],
    last_event_id: Annotated[str | None, Query(description="Resume after this id (EventSource cannot set "
                                                           "the Last-Event-ID header on a first connect).")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> SessionStreamResponse:
    """Follow a session's events. The session is created for the caller when the id is free."""
    after = parse_last_event_id(last_event_id_header, last_event_id)
    feed = await sessions.follow(principal, session_id, after)
    log.info("sse_stream_opened", session_id=session_id, last_event_id=after)
    heartbeat = container.settings.sse_heartbeat_seconds
    return SessionStreamResponse(
        _frames(sessions, principal, feed, session_id),
        headers=STREAM_HEADERS,
        ping=heartbeat,
        ping_message_factory=_ping,
        send_timeout=heartbeat * SEND_TIMEOUT_FACTOR,
        # Also when the body was never iterated (the client left before the first write).
        background=BackgroundTask(sessions.unfollow, principal, feed),
    )
