"""List, read and delete the caller's sessions, and read their stored events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from service.api.deps import SessionReader, SessionWriter, container_of
from service.api.problems import problem_responses
from service.api.schemas import EventList, SessionList, SessionView

router = APIRouter(prefix="/api/sessions", tags=["sessions"])

_PROBLEMS = problem_responses(404)


@router.get("", response_model=SessionList, responses=_PROBLEMS)
async def list_sessions(request: Request, principal: SessionReader) -> SessionList:
    """The caller's session ids, oldest first (every session's, for an admin)."""
    return SessionList(sessions=await container_of(request).sessions.ids(principal))


@router.get("/{session_id}", response_model=SessionView, responses=_PROBLEMS)
async def get_session(session_id: str, request: Request, principal: SessionReader) -> SessionView:
    """The session's conversation, todos and timestamps."""
    session = await container_of(request).sessions.get(principal, session_id)
    return SessionView.model_validate(session.to_dict())


@router.get("/{session_id}/events", response_model=EventList, responses=_PROBLEMS)
async def list_events(
    session_id: str,
    request: Request,
    principal: SessionReader,
    after: Annotated[int, Query(ge=0, description="Only events with a greater id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    """The stored events, oldest first, as the stream sends them."""
    events = await container_of(request).sessions.events(principal, session_id, after, limit)
    next_after = str(events[-1].id) if len(events) == limit else None
    return EventList(events=[e.to_dict() for e in events], next_after=next_after)


@router.delete("/{session_id}", status_code=204, responses=_PROBLEMS)
async def delete_session(session_id: str, request: Request, principal: SessionWriter) -> Response:
    """Delete the session with its tasks (a running one is cancelled first), events and workspace."""
    await container_of(request).sessions.delete(principal, session_id)
    return Response(status_code=204)
