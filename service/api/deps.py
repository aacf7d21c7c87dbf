"""FastAPI dependencies as ``Annotated`` aliases: the container's parts, and the authenticated principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.problems import ApiError
from service.api.ratelimit import limit
from service.app.access import SCOPES, Principal
from service.app.runner import TaskRunner
from service.app.sessions import SessionService
from service.container import Container
from service.tokens import InvalidToken, KeyNotCached, KeysUnavailable

COOKIE_NAME = "alex_token"
QUERY_TOKEN = "access_token"  # noqa: S105 -- the parameter's name, not a secret


def get_container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


ContainerDep = Annotated[Container, Depends(get_container)]


def get_runner(container: ContainerDep) -> TaskRunner:
    return container.runner


def get_sessions(container: ContainerDep) -> SessionService:
    return container.sessions


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
    container = get_container(request)
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
    container: ContainerDep,
    # Declares the scheme in the OpenAPI document; the token itself is read by bearer_token (cookie and query too).
    _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None,
) -> Principal:
    if container.verifier is None:
        return _ANONYMOUS
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "a bearer token is required", headers={"WWW-Authenticate": 'Bearer realm="alex-server"'})
    try:
        try:
            principal = container.verifier.verify(token)
        except KeyNotCached:
            await container.verifier.refresh_keys(token)
            principal = container.verifier.verify(token)
    except KeyNotCached:
        raise ApiError(401, "invalid token: unknown signing key",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    except KeysUnavailable:
        raise ApiError(503, "tokens cannot be verified right now (the key set is unavailable); retry shortly",
                       headers={"Retry-After": "5"}) from None
    except InvalidToken as exc:
        raise ApiError(
            401,
            f"invalid token: {exc.reason}",
            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'},
        ) from None
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def require(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: PrincipalDep) -> Principal:
        if not principal.has(scope):
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
