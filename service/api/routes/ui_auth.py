"""The web UI's side of authentication: the sign-in page, the ``alex_token`` cookie, the development sign-in on
localhost, and the CSRF check every UI ``POST`` and ``DELETE`` passes first.

The cookie carries the same bearer JWT the API takes (``api.deps.bearer_token`` reads it after the header), so
the UI's routes authenticate and authorise exactly as the API's do.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Annotated
from urllib.parse import parse_qsl, quote

import jwt
import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.api.deps import (
    COOKIE_NAME,
    DEFAULT_LIMIT,
    AuthFailure,
    ContainerDep,
    authenticate,
    bearer_token,
    verify_token,
)
from service.api.problems import ApiError
from service.app.access import DEFAULT_SCOPES, Principal
from service.container import Container
from service.domain.models import SESSION_ID_PATTERN
from service.tokens import mint_token
from service.web import WebAssets

router = APIRouter(include_in_schema=False)
log = structlog.get_logger("service.ui")

DEV_SUBJECT = "developer"
DEV_TOKEN_SECONDS = 3600
"""The development sign-in's token lifetime: a working session's length, short enough to leave nothing lasting."""
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 8
SIGN_IN = "/ui/sign-in"


def get_assets(request: Request) -> WebAssets:
    assets: WebAssets = request.app.state.web
    return assets


AssetsDep = Annotated[WebAssets, Depends(get_assets)]


async def same_origin(request: Request) -> None:
    """Refuses (403) a state-changing request that does not come from this server's own pages: its ``Origin``
    must be this server's, or, when a browser sent none or ``null``, ``Sec-Fetch-Site`` must say ``same-origin``.

    The cookie is SameSite=Strict as well; this check also covers browsers and proxies that weaken that.
    """
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    origin = request.headers.get("origin")
    # A plain form posted from a page under Referrer-Policy: no-referrer (every page here) says Origin: null;
    # then the browser's own Sec-Fetch-Site, which no script can set, tells where the request comes from.
    if origin is not None and origin != "null":
        if origin.lower() != own:
            raise ApiError(403, "cross-origin request refused: the Origin is not this server's")
        return
    if request.headers.get("sec-fetch-site") != "same-origin":
        raise ApiError(403, "request refused: it carries neither this server's Origin nor Sec-Fetch-Site: "
                            "same-origin")


SAME_ORIGIN = Depends(same_origin)


async def read_form(request: Request) -> dict[str, str]:
    """The fields of an ``application/x-www-form-urlencoded`` body (htmx's and plain forms' encoding); the last
    value of a repeated field wins; no body is no fields. 415 for another media type, 400 for a body that is not
    such a form."""
    body = await request.body()
    if not body:
        return {}
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM_MEDIA_TYPE:
        raise ApiError(415, f"the request body must be {FORM_MEDIA_TYPE}")
    try:
        text = body.decode("utf-8")
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS, errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the request body is not a valid form") from None


def session_field(value: str | None) -> str | None:
    """A session id from a form (empty is none); 422 when it is not a valid id."""
    if not value:
        return None
    if not SESSION_ID_PATTERN.fullmatch(value) or value in (".", ".."):
        raise ApiError(422, "session_id is not a valid session id")
    return value


def app_url(session_id: str | None) -> str:
    return "/" if session_id is None else f"/?session_id={quote(session_id)}"


def go_to(request: Request, url: str) -> Response:
    """Where a form posted by htmx (``HX-Redirect``) or by the browser itself (303) goes next."""
    if request.headers.get("hx-request") == "true":
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def set_token_cookie(response: Response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(COOKIE_NAME, token, max_age=max_age, path="/", secure=request.url.scheme == "https",
                        httponly=True, samesite="strict")


def clear_token_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(COOKIE_NAME, path="/", secure=request.url.scheme == "https", httponly=True,
                           samesite="strict")


async def page_principal(request: Request, container: Container) -> Principal | None:
    """The caller of a page, or None when it must sign in first (no token, or one that is refused)."""
    try:
        if container.verifier is not None and bearer_token(request) is None:
            return None  # a first visit, not an authentication failure
        return await authenticate(request)
    except AuthFailure as exc:
        if exc.status == 503:
            raise
        return None


def sign_in_redirect(request: Request, session_id: str | None) -> Response:
    """To the sign-in page (and back to ``session_id`` after it); a refused cookie is dropped on the way."""
    target = SIGN_IN if session_id is None else f"{SIGN_IN}?session_id={quote(session_id)}"
    response = RedirectResponse(target, status_code=303)
    if COOKIE_NAME in request.cookies:
        clear_token_cookie(response, request)
    return response


def is_local(request: Request) -> bool:
    """The client is on this machine and asked for it by a loopback name (a proxy in front forwards another
    Host, and a DNS-rebinding page sends its own)."""
    client = request.client.host if request.client is not None else ""
    try:
        loopback = ipaddress.ip_address(client).is_loopback
    except ValueError:
        return False
    host = request.headers.get("host", "").lower()
    name = host[: host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
    return loopback and name in LOCAL_HOSTS


def dev_sign_in_offered(request: Request, container: Container) -> bool:
    """Only with the secret the server made for itself (no one configured keys) and only from localhost."""
    key = container.signing_key
    return container.verifier is not None and key is not None and key.generated and is_local(request)


@router.get("/ui/sign-in", dependencies=[DEFAULT_LIMIT], response_class=HTMLResponse)
async def sign_in_page(
    request: Request,
    container: ContainerDep,
    assets: AssetsDep,
    session_id: Annotated[str | None, Query(pattern=SESSION_ID_PATTERN.pattern)] = None,
) -> Response:
    """The sign-in form; a caller who is already signed in goes straight to the app."""
    if await page_principal(request, container) is not None:
        return RedirectResponse(app_url(session_id), status_code=303)
    html = assets.templates.render("sign_in.html", session_id=session_id,
                                   dev_sign_in=dev_sign_in_offered(request, container), dev_subject=DEV_SUBJECT,
                                   dev_minutes=DEV_TOKEN_SECONDS // 60)
    return HTMLResponse(html)


@router.post("/ui/sign-in", dependencies=[SAME_ORIGIN, DEFAULT_LIMIT])
async def sign_in(request: Request, container: ContainerDep) -> Response:
    """Check a pasted token and keep it in the ``alex_token`` cookie, for no longer than the token lives."""
    fields = await read_form(request)
    session_id = session_field(fields.get("session_id"))
    token = fields.get("token", "").strip()
    if container.verifier is None:
        return go_to(request, app_url(session_id))
    if not token:
        raise ApiError(422, "paste a token to sign in")
    try:
        principal = await verify_token(container.verifier, token)
    except AuthFailure as exc:
        container.metrics.auth_failures.labels(exc.reason).inc()
        raise
    if not principal.has("sessions:read"):
        raise ApiError(403, "the token lacks the scope sessions:read, which the web UI needs")
    # The signature and the claims were checked just above; this only reads exp, which the verifier required.
    expires = jwt.decode(token, options={"verify_signature": False}).get("exp")
    max_age = int(expires - time.time()) if isinstance(expires, int | float) else 0
    if max_age <= 0:
        raise ApiError(401, "invalid token: token expired",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    response = go_to(request, app_url(session_id))
    set_token_cookie(response, request, token, max_age)
    log.info("ui_signed_in", subject=principal.subject, method="token")
    return response


@router.post("/ui/dev-sign-in", dependencies=[SAME_ORIGIN, DEFAULT_LIMIT])
async def dev_sign_in(request: Request, container: ContainerDep) -> Response:
    """Sign in as ``developer`` with the default scopes: offered only on localhost with the generated secret."""
    fields = await read_form(request)
    session_id = session_field(fields.get("session_id"))
    key = container.signing_key
    if key is None or not dev_sign_in_offered(request, container):
        raise ApiError(403, "the development sign-in is offered only from this machine (localhost), and only when "
                            "the server signs tokens with the secret it generated")
    settings = container.settings
    token = mint_token(key.secret, DEV_SUBJECT, DEFAULT_SCOPES, DEV_TOKEN_SECONDS, issuer=settings.jwt_issuer,
                       audience=settings.jwt_audience)
    response = go_to(request, app_url(session_id))
    set_token_cookie(response, request, token, DEV_TOKEN_SECONDS)
    log.info("ui_signed_in", subject=DEV_SUBJECT, method="development")
    return response


@router.post("/ui/sign-out", dependencies=[SAME_ORIGIN, DEFAULT_LIMIT])
async def sign_out(request: Request) -> Response:
    """Forget the cookie (the token itself stays valid until it expires: keep lifetimes short)."""
    response = go_to(request, SIGN_IN)
    clear_token_cookie(response, request)
    return response
