"""The web UI (htmx over SSE): the page at ``/``, its fragments and actions under ``/ui``, and the session's events
as HTML on ``/ui/sse``.

Every route goes through the same use cases (``TaskRunner``, ``SessionService``) with the same authentication,
scopes, ownership rules and rate limits as the API; another subject's session is a 404 here too. Every ``POST``
and ``DELETE`` first passes the CSRF check (``ui_auth.same_origin``). Errors are problem+json, which the page
shows in its alert line. docs/ui.md describes the routes.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import HTMLResponse, Response

from service.api.deps import (
    COOKIE_NAME,
    DEFAULT_LIMIT,
    ContainerDep,
    FormTaskSubmitter,
    RunnerDep,
    SessionReader,
    SessionsDep,
    SessionWriter,
    TaskWriter,
)
from service.api.problems import ApiError
from service.api.routes.stream import SessionStreamResponse, open_stream, parse_last_event_id
from service.api.routes.ui_auth import (
    SAME_ORIGIN,
    AssetsDep,
    app_url,
    page_principal,
    read_form,
    session_field,
    sign_in_redirect,
)
from service.app.access import Principal
from service.app.runner import TaskRunner
from service.app.sessions import SessionService
from service.container import Container
from service.domain.errors import NotFound
from service.domain.models import SESSION_ID_PATTERN
from service.web import WebAssets
from service.web.render import HtmlFrames

router = APIRouter(include_in_schema=False)

SessionIdQuery = Annotated[str, Query(pattern=SESSION_ID_PATTERN.pattern)]


class SessionLookup:
    """The renderer's questions about one session, answered with the reader's rights."""

    def __init__(self, principal: Principal, sessions: SessionService, runner: TaskRunner, session_id: str) -> None:
        self._principal = principal
        self._sessions = sessions
        self._runner = runner
        self._session_id = session_id

    async def task_text(self, task_id: str) -> str | None:
        try:
            return (await self._runner.get(self._principal, task_id)).text
        except NotFound:
            return None

    async def task_at(self, event_id: int) -> str | None:
        try:
            found = await self._sessions.events(self._principal, self._session_id, event_id - 1, 1)
        except NotFound:
            return None
        return found[0].task_id if found and found[0].id == event_id else None


def _session_view(assets: WebAssets, container: Container, session_id: str, template: str = "_session.html",
                  ) -> str:
    return assets.templates.render(template, session_id=session_id, current=session_id,
                                   max_task_chars=container.settings.max_task_chars)


@router.get("/", response_class=HTMLResponse, dependencies=[DEFAULT_LIMIT])
async def app_page(
    request: Request,
    container: ContainerDep,
    sessions: SessionsDep,
    assets: AssetsDep,
    session_id: Annotated[str | None, Query(pattern=SESSION_ID_PATTERN.pattern)] = None,
) -> Response:
    """The app: the caller's sessions and, with ``?session_id=``, that session (its history replays, then live)."""
    principal = await page_principal(request, container)
    if principal is None:
        if request.headers.get("sec-fetch-site") == "cross-site" and COOKIE_NAME not in request.cookies:
            # A link on another site: the browser held back the SameSite=Strict cookie. The page asks for itself
            # again, now from this site, so that a signed-in user lands in the session and not on the sign-in.
            return HTMLResponse(assets.templates.render("reload.html"))
        return sign_in_redirect(request, session_id)
    if not principal.has("sessions:read"):
        raise ApiError(403, "the token lacks the scope sessions:read")
    if session_id is not None:
        await sessions.get(principal, session_id)
    ids = await sessions.ids(principal)
    html = assets.templates.render(
        "app.html",
        subject=principal.subject,
        auth_enabled=container.verifier is not None,
        sessions=list(reversed(ids)),
        session_id=session_id,
        current=session_id,
        max_task_chars=container.settings.max_task_chars,
    )
    return HTMLResponse(html)


@router.get("/ui/sessions/{session_id}", response_class=HTMLResponse)
async def session_fragment(session_id: str, principal: SessionReader, sessions: SessionsDep, container: ContainerDep,
                           assets: AssetsDep) -> HTMLResponse:
    """A session's view, for switching sessions without reloading the page."""
    await sessions.get(principal, session_id)
    return HTMLResponse(_session_view(assets, container, session_id))


@router.post("/ui/sessions", status_code=201, response_class=HTMLResponse, dependencies=[SAME_ORIGIN])
async def new_session(principal: TaskWriter, sessions: SessionsDep, container: ContainerDep,
                      assets: AssetsDep) -> HTMLResponse:
    """A new session: its view, its entry in the list, and its address pushed into the browser's history."""
    session = await sessions.create(principal)
    html = _session_view(assets, container, session.id, "_session_created.html")
    return HTMLResponse(html, status_code=201, headers={"HX-Push-Url": app_url(session.id)})


@router.delete("/ui/sessions/{session_id}", response_class=HTMLResponse, dependencies=[SAME_ORIGIN])
async def delete_session(
    session_id: str,
    principal: SessionWriter,
    sessions: SessionsDep,
    assets: AssetsDep,
    current_url: Annotated[str | None, Header(alias="HX-Current-URL")] = None,
) -> HTMLResponse:
    """Delete a session (as ``DELETE /api/sessions/{id}``); its entry leaves the list, and the page leaves it
    when it was the one open."""
    await sessions.delete(principal, session_id)
    html = assets.templates.render("_session_deleted.html", session_id=session_id)
    open_ids = parse_qs(urlsplit(current_url or "").query).get("session_id", [])
    if session_id in open_ids:
        return HTMLResponse(html + assets.templates.render("_empty.html"),
                            headers={"HX-Retarget": "#main", "HX-Reswap": "innerHTML", "HX-Push-Url": "/"})
    return HTMLResponse(html, headers={"HX-Reswap": "none"})


@router.post("/ui/tasks", status_code=202, dependencies=[SAME_ORIGIN])
async def submit_task(request: Request, principal: FormTaskSubmitter, runner: RunnerDep) -> Response:
    """Start a task from the task box (form fields ``task`` and ``session_id``); its events arrive on the stream."""
    fields = await read_form(request)
    text = fields.get("task")
    session_id = session_field(fields.get("session_id"))
    if text is None:
        raise ApiError(422, "the form field task is required")
    if session_id is None:
        raise ApiError(422, "the form field session_id is required")
    # A browser's own form submission sends a textarea's line ends as CRLF; the API's clients send what they type.
    task = await runner.submit(principal, text.replace("\r\n", "\n"), session_id)
    return Response(status_code=202, headers={"Location": f"/api/tasks/{quote(task.id)}"})


@router.post("/ui/tasks/{task_id}/cancel", status_code=202, dependencies=[SAME_ORIGIN])
async def cancel_task(task_id: str, principal: TaskWriter, runner: RunnerDep) -> Response:
    """Stop the running task (as ``POST /api/tasks/{id}/cancel``); ``task_cancelled`` follows on the stream."""
    await runner.cancel(principal, task_id)
    return Response(status_code=202)


@router.get("/ui/sse", response_class=SessionStreamResponse)
async def stream_fragments(
    request: Request,
    principal: SessionReader,
    sessions: SessionsDep,
    runner: RunnerDep,
    container: ContainerDep,
    assets: AssetsDep,
    session_id: SessionIdQuery,
    last_event_id: str | None = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> SessionStreamResponse:
    """The session's events as HTML fragments: the stream of ``/api/sse`` (same ids, same resume), rendered."""
    after = parse_last_event_id(last_event_id_header, last_event_id)
    lookup = SessionLookup(principal, sessions, runner, session_id)
    renderer = HtmlFrames(assets.templates, lookup, session_id, after)
    return await open_stream(request, principal, sessions, container, session_id, after, renderer)


@router.get("/ui/static/{path:path}")
async def static_file(path: str, request: Request, assets: AssetsDep) -> Response:
    """The UI's stylesheet, script and vendored htmx; a route (not a mount) so that metrics name it."""
    return await assets.static.get_response(path, request.scope)
