"""What every HTTP request leaves behind: a server span, its metrics, and one log line, under one request id.

Pure ASGI, so streams pass untouched; an event stream is one span and one count, and its lifetime is kept out of
the request-duration histogram (it is not latency). The span continues the caller's W3C ``traceparent``; it is
current while the request is served, so a task submitted here joins the caller's trace. Query values that carry
tokens are replaced before the line is written.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.stream_host import HANDOFF, Handoff
from service.observability.metrics import Metrics
from service.observability.tracing import extract_context

log = structlog.get_logger("service.api.access")

_SECRET_PARAMS = frozenset({"access_token", "token"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_STARTED = "alex.started"
_ACCOUNT_KEYS = ("route", "method", "path", "query_string", "state")
UNMATCHED = "unmatched"
"""The ``route`` label of a request no route took (a 404 on an unknown path): paths are not a bounded value."""


def _defer(handoff: Handoff | None, scope: Scope, close: Callable[[Scope], None], span: trace.Span) -> bool:
    """A stream that goes on outside the framework's call (``StreamHost``) closes the request's account when it
    ends: from the part of the scope the account reads, so that the framework's share of the scope is freed now."""
    if handoff is None or not handoff.taken:
        return False
    kept = {key: scope[key] for key in _ACCOUNT_KEYS if key in scope}
    handoff.on_end.extend((functools.partial(close, kept), span.end))
    return True


def redact_query(raw: bytes) -> str:
    if not raw:
        return ""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, "[redacted]" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs])


def request_started(scope: Scope) -> float:
    """When (``time.monotonic``) the request reached the service."""
    started: float = scope.get("state", {}).get(_STARTED, time.monotonic())
    return started


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def _read_headers(scope: Scope) -> tuple[str, dict[str, str]]:
    """The request id (the client's, or a new one) and the W3C trace context headers."""
    request_id = ""
    carrier: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            request_id = value.decode("latin-1")[:64]
        elif key in _TRACE_HEADERS:
            carrier[key.decode()] = value.decode("latin-1")
    return request_id or secrets.token_hex(8), carrier


class RequestTelemetry:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, tracer: Tracer, untraced: frozenset[str] = frozenset()
                 ) -> None:
        """``untraced``: paths of probes and scrapes. Every few seconds from every kubelet and Prometheus, they would
        bury the traces that matter: they are counted in ``alex_http_requests_total`` and logged, but get no span
        and stay out of the in-flight gauge."""
        self._app = app
        self._metrics = metrics
        self._tracer = tracer
        self._untraced = untraced

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.monotonic()
        scope.setdefault("state", {})[_STARTED] = started
        request_id, carrier = _read_headers(scope)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        parent = extract_context(carrier) if carrier else None
        probe = scope["path"] in self._untraced
        span = trace.INVALID_SPAN if probe else self._start_span(scope, method, request_id, parent)
        in_flight = self._metrics.http_requests_in_flight
        # A scrape would count itself (never below 1) and probes are not the load anyone asks about.
        counted = not probe
        if counted:
            in_flight.inc()
        status = 0
        streaming = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, streaming, counted
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                headers.append((b"x-request-id", request_id.encode()))
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
                if streaming and counted:
                    in_flight.dec()
                    counted = False
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span, parent))
        handoff: Handoff | None = scope.get("extensions", {}).get(HANDOFF)
        deferred = False
        try:
            with structlog.contextvars.bound_contextvars(request_id=request_id):
                try:
                    await self._app(scope, receive, send_with_id)
                except BaseException as exc:
                    span.record_exception(exc)
                    raise
                finally:
                    close = functools.partial(self._finish, span=span, method=method, status=status or 500,
                                              streaming=streaming, started=started)
                    deferred = _defer(handoff, scope, close, span)
                    if not deferred:
                        close(scope)
        finally:
            if counted:
                in_flight.dec()
            otel_context.detach(token)
            if not deferred:
                span.end()

    def _start_span(self, scope: Scope, method: str, request_id: str,
                    parent: otel_context.Context | None) -> trace.Span:
        return self._tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"],
                        "url.scheme": scope.get("scheme", "http"), "alex.request_id": request_id},
        )

    def _finish(self, scope: Scope, span: trace.Span, method: str, *, status: int, streaming: bool,
                started: float) -> None:
        seconds = time.monotonic() - started
        route = route_template(scope)
        self._metrics.http_requests_by(method, route, str(status)).inc()
        if not streaming:
            self._metrics.http_request_duration_by(method, route).observe(seconds)
        span.update_name(f"{method} {route}" if route != UNMATCHED else method)
        span.set_attribute("http.response.status_code", status)
        if route != UNMATCHED:
            span.set_attribute("http.route", route)
        if status >= 500:
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        principal = scope.get("state", {}).get("principal")
        log.info(
            "http_request",
            method=scope["method"],
            path=scope["path"],
            route=route,
            query=redact_query(scope.get("query_string", b"")),
            status=status,
            duration_ms=round(seconds * 1000, 2),
            streaming=streaming or None,
            subject=getattr(principal, "subject", None),
        )
