"""Request bodies capped before they are read whole: 413 for a declared or an actual size over the limit.

Pure ASGI (no ``BaseHTTPMiddleware``), so that streaming responses and disconnect detection are untouched.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import ApiError, problem


class _TooLarge(ApiError):
    """Raised from ``receive``: the app's problem handlers turn it into a 413 like any other API error."""


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(scope, receive, send, 400, "Content-Length is not a number")
                    return
                if declared > self._max:
                    await self._reject(scope, receive, send, 413, self._message())
                    return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max:
                    raise _TooLarge(413, self._message(), headers={"Connection": "close"})
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, receive, send, 413, self._message())

    def _message(self) -> str:
        return f"the request body is larger than {self._max} bytes"

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await problem(status, detail, headers={"Connection": "close"})(scope, receive, send)
