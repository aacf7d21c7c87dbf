"""Every error as ``application/problem+json`` (RFC 9457), from one table of domain errors to statuses."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import Problem
from service.domain.errors import Conflict, DomainError, Invalid, LimitExceeded, NotFound, Unavailable

PROBLEM_JSON = "application/problem+json"

log = structlog.get_logger("service.api")

_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Conflict: 409,
    Invalid: 422,
    LimitExceeded: 429,
    Unavailable: 503,
}


class ApiError(Exception):
    """An error raised by the HTTP layer itself (auth, media type, body size), with its status and headers."""

    def __init__(self, status: int, detail: str, *, headers: Mapping[str, str] | None = None,
                 title: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        self.title = title


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses: each a problem+json body (the ``Problem`` schema).

    Every authenticated route answers 401, 403, 422 and 429 as well; they are always included.
    """
    schema = {"$ref": "#/components/schemas/Problem"}
    statuses = sorted({401, 403, 422, 429, *codes})
    return {code: {"description": HTTPStatus(code).phrase, "content": {PROBLEM_JSON: {"schema": schema}}}
            for code in statuses}


def _slug(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-").replace("'", "")
    except ValueError:
        return "error"


def problem(status: int, detail: str, *, title: str | None = None, headers: Mapping[str, str] | None = None,
            errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:alex-server:problem:{_slug(status)}",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    status = next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 400)
    headers: dict[str, str] = {}
    if isinstance(exc, LimitExceeded):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unavailable):
        headers["Retry-After"] = "1"
    return problem(status, str(exc), headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return problem(exc.status, exc.detail, title=exc.title, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    raw = exc.errors()
    if any(e.get("type") == "json_invalid" for e in raw):
        return problem(400, "the request body is not valid JSON")
    errors = [{"loc": _location(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in raw]
    return problem(422, "the request is not valid: " + "; ".join(f"{e['loc']}: {e['msg']}" for e in errors),
                   errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return problem(exc.status_code, str(exc.detail), headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("request_failed", path=request.url.path)
    return problem(500, "internal error; the server logged the details")


def install_problem_schema(app: FastAPI) -> None:
    """Put the ``Problem`` schema (which :func:`problem_responses` refers to) into the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the document


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
