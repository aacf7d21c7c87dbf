"""FastAPI dependencies as ``Annotated`` aliases: the container's parts, and the caller's principal.

An API route has one dependency, :class:`Access`, which counts the request against its rate limit, authenticates
the caller and checks the scope the route needs; the route reads the container from the request itself. FastAPI
solves every dependency of a route again on every request, each at a cost of tens of microseconds whatever it
does, so a chain (limit, scope check, authentication, bearer scheme, container) cost several times what the
checks themselves do. The bearer scheme is declared in the OpenAPI document (:func:`install_security_schema`)
rather than by a dependency that would run on every request only to be documented.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute, APIRouter

from service.api.problems import ApiError
from service.api.ratelimit import limit as rate_limit
from service.app.access import SCOPES, Principal
from service.app.runner import TaskRunner
from service.app.sessions import SessionService
from service.container import Container
from service.tokens import InvalidToken, KeyNotCached, KeysUnavailable, TokenVerifier

COOKIE_NAME = "alex_token"
QUERY_TOKEN = "access_token"  # noqa: S105 -- the parameter's name, not a secret


def container_of(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


async def get_container(request: Request) -> Container:
    return container_of(request)


ContainerDep = Annotated[Container, Depends(get_container)]


async def get_runner(request: Request) -> TaskRunner:
    return container_of(request).runner


async def get_sessions(request: Request) -> SessionService:
    return container_of(request).sessions


RunnerDep = Annotated[TaskRunner, Depends(get_runner)]
SessionsDep = Annotated[SessionService, Depends(get_sessions)]

_ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


def bearer_token(request: Request) -> str | None:
    """The token from ``Authorization: Bearer``, else the ``alex_token`` cookie, else (GET only) ``access_token``.

    Browsers' ``EventSource`` cannot set headers, hence the cookie and, last, the query parameter.
    """
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "the Authorization header must be 'Bearer <token>'",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_request"'})
        return value.strip()
    cookie = request.cookies.get(COOKIE_NAME)
    if cookie:
        return cookie
    if request.method == "GET":
        return request.query_params.get(QUERY_TOKEN) or None
    return None


def token_subject(request: Request) -> str | None:
    """The subject of the request's token when it is valid, else None; verified once per request (cached).

    Rate limits key on it before authentication runs, so that requests without a valid token count by address.
    """
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached.subject
    container = container_of(request)
    if container.verifier is None:
        return _ANONYMOUS.subject
    try:
        token = bearer_token(request)
        if token is None:
            return None
        principal = container.verifier.verify(token)
    except (ApiError, InvalidToken, KeyNotCached, KeysUnavailable):
        return None
    request.state.principal = principal
    return principal.subject


async def authenticate(request: Request) -> Principal:
    """The request's principal: its token verified (once per request), or the anonymous one with authentication
    off; :class:`AuthFailure` otherwise."""
    container = container_of(request)
    if container.verifier is None:
        return _ANONYMOUS
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is None:
        try:
            cached = await _verify(request, container.verifier)
        except AuthFailure as exc:
            container.metrics.auth_failures.labels(exc.reason).inc()
            raise
        request.state.principal = cached
    structlog.contextvars.bind_contextvars(subject=cached.subject)
    return cached


class AuthFailure(ApiError):
    """A request refused by authentication; ``reason`` is its bounded metric label."""

    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str]) -> None:
        super().__init__(status, detail, headers=headers)
        self.reason = reason


_INVALID_TOKEN_REASONS = {
    "malformed token": "malformed_token",
    "algorithm not allowed": "algorithm_not_allowed",
    "token expired": "expired",
    "token not yet valid": "not_yet_valid",
    "wrong issuer": "wrong_issuer",
    "wrong audience": "wrong_audience",
    "bad signature": "bad_signature",
    "unknown signing key": "unknown_key",
}


def failure_reason(exc: InvalidToken) -> str:
    """The bounded metric label of a refused token."""
    if exc.reason.startswith("missing claim"):
        return "missing_claim"
    return _INVALID_TOKEN_REASONS.get(exc.reason, "invalid")


async def _verify(request: Request, verifier: TokenVerifier) -> Principal:
    try:
        token = bearer_token(request)
    except ApiError as exc:
        raise AuthFailure(exc.status, "malformed_header", exc.detail, exc.headers) from None
    if token is None:
        raise AuthFailure(401, "missing_token", "a bearer token is required",
                       {"WWW-Authenticate": 'Bearer realm="alex-server"'})
    return await verify_token(verifier, token)


async def verify_token(verifier: TokenVerifier, token: str) -> Principal:
    """The principal of ``token``, fetching the key set again for an unknown key; :class:`AuthFailure` otherwise
    (401, or 503 while the key set cannot be had). The web UI's sign-in checks a pasted token with it too."""
    try:
        try:
            return verifier.verify(token)
        except KeyNotCached:
            await verifier.refresh_keys(token)
            return verifier.verify(token)
    except KeyNotCached:
        raise AuthFailure(401, "unknown_key", "invalid token: unknown signing key",
                       {"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    except KeysUnavailable:
        raise AuthFailure(503, "keys_unavailable",
                       "tokens cannot be verified right now (the key set is unavailable); retry shortly",
                       {"Retry-After": "5"}) from None
    except InvalidToken as exc:
        raise AuthFailure(
            401,
            failure_reason(exc),
            f"invalid token: {exc.reason}",
            {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'},
        ) from None


def require_json(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "the request body must be application/json")


class Access:
    """The dependency of a route that acts for a caller, in this order: the request counts against the ``limit``
    rate limit (``tasks`` or ``default``); with ``json_body``, the body must be JSON (415); the caller must
    authenticate (401, or 503 while the key set is unavailable); its token must grant ``scope`` (403). Returns the
    principal."""

    def __init__(self, scope: str, *, limit: str = "default", json_body: bool = False) -> None:
        self.scope = scope
        self._count = rate_limit(limit, token_subject)
        self._json_body = json_body

    async def __call__(self, request: Request) -> Principal:
        await self._count(request)
        if self._json_body:
            require_json(request)
        principal = await authenticate(request)
        if not principal.has(self.scope):
            container_of(request).metrics.auth_failures.labels("insufficient_scope").inc()
            raise ApiError(
                403,
                f"the token lacks the scope {self.scope}",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{self.scope}"'},
            )
        return principal


DEFAULT_LIMIT = Depends(rate_limit("default", token_subject))
"""The default rate limit alone, for routes that authenticate in their own way or not at all (the web UI's page
and sign-in routes, which send a caller without a token to sign in rather than answer 401)."""

TaskSubmitter = Annotated[Principal, Depends(Access("tasks:write", limit="tasks", json_body=True))]
TaskWriter = Annotated[Principal, Depends(Access("tasks:write"))]
FormTaskSubmitter = Annotated[Principal, Depends(Access("tasks:write", limit="tasks"))]
"""The web UI's task box: a form, not JSON."""
SessionReader = Annotated[Principal, Depends(Access("sessions:read"))]
SessionWriter = Annotated[Principal, Depends(Access("sessions:write"))]

BEARER_SCHEME = "HTTPBearer"
_BEARER_DOCUMENT = {"type": "http", "scheme": "bearer",
                    "description": "A JWT; see docs/security.md for the keys and claims."}


def install_security_schema(app: FastAPI, routers: Iterable[APIRouter]) -> None:
    """Declare the bearer scheme in the OpenAPI document, and require it on every operation whose route (in
    ``routers``, which the application includes) has an :class:`Access` dependency. The token may also come as a
    cookie or, on ``GET``, as the ``access_token`` query parameter: see :func:`bearer_token`."""
    build = app.openapi
    routes = [route for router in routers for route in router.routes]

    def openapi() -> dict[str, Any]:
        document = build()
        schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
        if BEARER_SCHEME not in schemes:
            schemes[BEARER_SCHEME] = dict(_BEARER_DOCUMENT)
            paths = document.get("paths", {})
            for route in routes:
                if isinstance(route, APIRoute) and route.path_format in paths and _has_access(route):
                    for method in route.methods or ():
                        operation = paths[route.path_format].get(method.lower())
                        if operation is not None:
                            operation["security"] = [{BEARER_SCHEME: []}]
        return document

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the document


def _has_access(route: APIRoute) -> bool:
    return any(isinstance(dependency.call, Access) for dependency in route.dependant.dependencies)
