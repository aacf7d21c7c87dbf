"""FastAPI dependencies as ``Annotated`` aliases: the container's parts, and the authenticated principal.

The aliases read the container from the request themselves rather than through ``ContainerDep``: FastAPI solves
every sub-dependency of every use again before it looks in its per-request cache, so a shared ``ContainerDep``
under the runner, the principal and the scope check cost several solves per request for one attribute read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.problems import ApiError
from service.api.ratelimit import limit
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


_BEARER = HTTPBearer(auto_error=False, description="A JWT; see docs/security.md for the keys and claims.")


async def authenticate(
    request: Request,
    # Declares the scheme in the OpenAPI document; the token itself is read by bearer_token (cookie and query too).
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None,
) -> Principal:
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


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require(scope: str) -> Callable[[Principal, Request], Awaitable[Principal]]:
    async def check(principal: PrincipalDep, request: Request) -> Principal:
        if not principal.has(scope):
            container_of(request).metrics.auth_failures.labels("insufficient_scope").inc()
            raise ApiError(
                403,
                f"the token lacks the scope {scope}",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return principal

    return check


TASKS_LIMIT = Depends(limit("tasks", token_subject))
DEFAULT_LIMIT = Depends(limit("default", token_subject))

TaskWriter = Annotated[Principal, Depends(require("tasks:write"))]
SessionReader = Annotated[Principal, Depends(require("sessions:read"))]
SessionWriter = Annotated[Principal, Depends(require("sessions:write"))]
