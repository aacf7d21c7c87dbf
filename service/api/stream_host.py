"""The outermost layer of the application, under which event streams write straight to the server and, once open,
may leave the framework (see :mod:`service.api.sse`)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

HANDOFF = "alex.stream_handoff"
"""The ``scope["extensions"]`` key under which :class:`StreamHost` offers a :class:`Handoff`."""


class Handoff:
    """What :class:`StreamHost` offers the response of one request (``scope["extensions"]["alex.stream_handoff"]``).

    ``send`` is the server's own. When ``enabled``, a stream may leave the framework once its head is out
    (:meth:`take`); layers above it that account for the whole request (its log line, its span) then add their
    closing step to ``on_end``, run when the stream ends, in the request's context.
    """

    __slots__ = ("abandon", "enabled", "on_end", "send", "stream", "taken")

    def __init__(self, send: Send, enabled: bool) -> None:
        self.send = send
        self.enabled = enabled
        self.taken = False
        """True once a stream has taken the request over (the framework's call returns before it ends)."""
        self.stream: Callable[[], Awaitable[None]] | None = None
        self.abandon: Callable[[], None] | None = None
        self.on_end: list[Callable[[], None]] = []

    def take(self, stream: Callable[[], Awaitable[None]], abandon: Callable[[], None]) -> None:
        self.taken = True
        self.stream = stream
        self.abandon = abandon


_HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"


class _Chunker:
    """Frames as chunks of a chunked body. An event goes to all its session's streams one after the other: its
    chunk is made once for all of them (the last one made is kept, in ``chunk``, for the frame in ``data``)."""

    __slots__ = ("chunk", "data")

    def __init__(self) -> None:
        self.data = self.chunk = b""

    def make(self, data: bytes) -> None:
        self.chunk = b"%x\r\n%b\r\n" % (len(data), data)
        self.data = data


_chunker = _Chunker()


class _Turn:
    """The turn of one event loop its socket writers are in, as ``token``: an object made at the first frame a writer
    sends in a turn, and dropped at the turn's end (:meth:`end`), when every frame held back during it goes out."""

    __slots__ = ("held", "token")

    def __init__(self) -> None:
        self.token: object | None = None
        self.held: list[Callable[[], None]] = []
        """The ``flush`` of each writer that held frames back in this turn."""

    def begin(self) -> object:
        token = self.token = object()
        asyncio.get_running_loop().call_soon(self.end)
        return token

    def end(self) -> None:
        self.token = None
        held, self.held = self.held, []
        for flush in held:
            flush()


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turn] = weakref.WeakKeyDictionary()
"""One per event loop (a server runs one; tests run many, and a loop closed mid-turn must not leave its turn open
for the next). A turn holds no reference to its loop, which can go."""


def _turn_of(loop: asyncio.AbstractEventLoop) -> _Turn:
    turn = _TURNS.get(loop)
    if turn is None:
        turn = _TURNS[loop] = _Turn()
    return turn


class _Ended:
    """What a writer reads as its flow control once its response is ending: writes paused for good."""

    write_paused = True


_ENDED = _Ended()


class SocketWriter:
    """Body chunks of one response straight to its connection (see :func:`socket_writer`): ``write(frame) -> bool``;
    ``flush()`` sends what ``write`` held back in this turn of the loop at once (the stream's own writes call it
    first, to keep the frames in order); ``end()`` flushes and stops, before the response's last message.

    ``write`` is the one step of a delivery that touches the connection, once per stream an event goes to, so it
    reads as little as it can: its own slots, the flow control and the transport, not uvicorn's request cycle. Of
    the cycle's states that forbid a write, ``disconnected`` comes only with a closed transport, and
    ``response_complete`` only after the stream's own last message, which :meth:`end` precedes.
    """

    __slots__ = ("_cycle", "_flow", "_held", "_transport", "_turn", "_wrote_in")

    def __init__(self, cycle: Any, turn: _Turn) -> None:
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow
        self._turn = turn
        self._held: list[bytes] = []
        self._wrote_in: object | None = None
        """The turn in which this connection last wrote a frame at once."""

    def write(self, data: bytes) -> bool:
        transport = self._transport
        if self._flow.write_paused or transport.is_closing():
            return False
        chunker = _chunker
        if data is not chunker.data:
            chunker.make(data)
        turn = self._turn
        now = turn.token or turn.begin()
        if self._wrote_in is now:
            held = self._held
            if not held:
                turn.held.append(self.flush)
            held.append(chunker.chunk)
            return True
        transport.write(chunker.chunk)
        self._wrote_in = now
        return True

    def flush(self) -> None:
        held = self._held
        if not held:
            return
        cycle = self._cycle
        if not (cycle.disconnected or cycle.response_complete or self._transport.is_closing()):
            self._transport.write(b"".join(held))
        held.clear()

    def end(self) -> None:
        """Send what is held; from now on ``write`` writes nothing (the response's last message goes next)."""
        self.flush()
        self._flow = _ENDED


def socket_writer(send: Send) -> SocketWriter | None:
    """For the server's own ``send`` of a response whose head went out with chunked framing: a writer of body
    chunks straight to the connection, whose ``write`` returns False, writing nothing, when it cannot right now (the
    socket takes no more bytes, the connection is closing, the writer has ended). None for any other server.

    This is what the server's ``send`` does for a body chunk that need not wait, without a coroutine, a message
    dict or the checks of a head. The first frame of a turn of the event loop goes out at once; the next ones in the
    same turn (an engine often emits a few events for a session in one turn) are held and go out together at the
    end of the turn, in one system call, which also wakes the client once. A held frame counts as written: it goes
    out even if the socket fills up meanwhile (a turn's frames are few; see ``LogSink``'s burst), and is dropped
    only with the connection.

    It knows uvicorn's httptools protocol (the one ``alex-server serve`` runs), and only its request cycle's
    ``transport``, ``flow``, ``chunked_encoding``, ``disconnected`` and ``response_complete`` (the last two when it
    flushes); ``tests/unit/test_sse.py`` holds it to the real class.
    """
    cycle: Any = getattr(send, "__self__", None)
    if type(cycle).__module__ != _HTTPTOOLS_CYCLE or getattr(cycle, "chunked_encoding", None) is not True:
        return None
    return SocketWriter(cycle, _turn_of(asyncio.get_running_loop()))


class StreamHost:
    """The outermost layer of the application: passes the server's ``send`` to event streams and, when
    ``hand_off``, carries them on once the framework has opened them.

    An :class:`~service.api.sse.EventStreamResponse` sends its head (status and headers) through the whole
    application, as any response does, so every middleware sees it: security and rate-limit headers, the request's
    metrics, log line and span. Its frames then go straight to the server's ``send``, skipping the half dozen
    wrappers that only ever look at a response head: nothing in the stack reads or changes a response body (a
    middleware that must, compression say, would not see a stream's frames).

    With ``hand_off``, the stream goes further: it returns from the framework's call right after its head, and this
    host runs the rest of it, at the bottom of the stack, in the context (log fields, trace) the request had. The
    request's middleware frames, dependency caches and exit stacks are freed at once instead of living as long as
    the stream, which was most of its memory. The layers above that account for the whole request must then close
    their account from :attr:`Handoff.on_end`. The framework gets a copy of the scope, so what it keeps there goes
    with its call.

    Served without the host (an in-process test client), a stream writes through the middleware and runs inside
    the framework's call, with the same behaviour.
    """

    def __init__(self, app: ASGIApp, *, hand_off: bool = False) -> None:
        self.app = app
        self.hand_off = hand_off

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handoff = Handoff(send, self.hand_off)
        inner = dict(scope) if self.hand_off else scope
        inner["extensions"] = {**(scope.get("extensions") or {}), HANDOFF: handoff}
        if self.hand_off and "state" in scope:
            inner["state"] = dict(scope["state"])
        try:
            await self.app(inner, receive, send)
        except BaseException:
            if handoff.abandon is not None:
                handoff.abandon()
            raise
        del inner
        if handoff.stream is not None:
            stream = handoff.stream()
            # Nothing but the running stream should keep its request's leftovers alive.
            handoff.stream = handoff.abandon = None
            await stream
