"""Security headers on every response: nothing here may be framed, sniffed into another type, or leak a referrer.

The API serves JSON and event streams only, so its content security policy allows nothing at all; the web UI's
pages set their own, wider policy (scripts and styles from this origin).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
UI_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
             "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
"""The web UI's pages (``/`` and ``/ui/...``): its scripts, styles and streams from this origin, nothing inline."""
UI_PREFIX = "/ui/"

_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_HEADERS = [*_COMMON, (b"content-security-policy", API_POLICY.encode())]
_UI_HEADERS = [*_COMMON, (b"content-security-policy", UI_POLICY.encode())]


class ResponseHeaders(ABC):
    """Pure ASGI middleware that adds headers to every HTTP response it passes on; a header the response already
    has is kept. Subclasses say which headers, per request."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    @abstractmethod
    def headers_for(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The headers to add to this request's response."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in self.headers_for(scope) if k not in present]
                message["headers"] = headers
            await send(message)

        await self._app(scope, receive, send_with_headers)


class SecurityHeaders(ResponseHeaders):
    def headers_for(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        path: str = scope["path"]
        return _UI_HEADERS if path == "/" or path.startswith(UI_PREFIX) else _HEADERS
