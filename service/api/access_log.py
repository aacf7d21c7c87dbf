"""One log line per request, with a request id bound for everything logged meanwhile.

Pure ASGI, so streams are untouched. Query values that carry tokens are replaced before the line is written.
"""

from __future__ import annotations

import secrets
import time
from urllib.parse import parse_qsl, urlencode

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("service.api.access")

_SECRET_PARAMS = frozenset({"access_token", "token"})


def redact_query(raw: bytes) -> str:
    if not raw:
        return ""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, "[redacted]" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs])


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        request_id = next((v.decode("latin-1")[:64] for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = request_id or secrets.token_hex(8)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self._app(scope, receive, send_with_id)
            finally:
                state = scope.get("state") or {}
                principal = state.get("principal")
                log.info(
                    "http_request",
                    method=scope["method"],
                    path=scope["path"],
                    query=redact_query(scope.get("query_string", b"")),
                    status=status or 500,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    subject=getattr(principal, "subject", None),
                )
