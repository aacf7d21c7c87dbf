"""Request bodies capped before the application reads them: 413 for a declared or an actual size over the limit.

A body with a ``Content-Length`` is judged by it (HTTP framing holds the client to it). A chunked body is read here,
up to the limit, and handed on whole: the application's own body reading turns any error raised while it reads
into a 400, so the cap cannot be enforced from inside ``receive``. Pure ASGI (no ``BaseHTTPMiddleware``), so that
streaming responses and disconnect detection are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem


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
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self._app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the application sees an empty body and then the disconnect
            body += message.get("body", b"")
            if len(body) > self._max:
                await self._reject(scope, receive, send, 413, self._message())
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self._app(scope, replay, send)

    def _message(self) -> str:
        return f"the request body is larger than {self._max} bytes"

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await _drain(receive)
        await problem(status, detail, headers={"Connection": "close"})(scope, receive, send)


DRAIN_BYTES = 16 * 1024 * 1024
DRAIN_SECONDS = 5.0


async def _drain(receive: Receive) -> None:
    """Read (and drop) what the client is still sending, within bounds, before answering.

    A client that is still writing its body when the connection closes under it sees a broken pipe, never the
    413 that explains why: most HTTP clients read the answer only once they have sent the request.
    """
    taken = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            while taken <= DRAIN_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                taken += len(message.get("body", b""))
