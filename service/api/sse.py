"""The event-stream response: a :class:`FrameSource`'s writes on one HTTP response, with heartbeats, cut-offs and,
under load, batched writes.

This is the last step of delivery, taken once per write of every stream, so it does as little as it can:

- Once its response head has gone out through the middleware stack, a stream writes straight to the server's
  ``send`` (:class:`~service.api.stream_host.StreamHost`), skipping the half dozen send wrappers that only ever
  look at a response head. With ``hand_off`` it also leaves the framework: the request's call through FastAPI,
  Starlette and every middleware returns, and the stream goes on in the host, at the bottom of the stack, so the
  request, its middleware frames, dependency caches and exit stacks are freed at once instead of living as long as
  the stream (they are most of its memory).
- A stream is two tasks: one writes, at the top of its own short stack; the request's task waits for the client
  to leave. sse-starlette, which this replaces, ran four tasks per stream in an anyio task group.
- Heartbeats and the send timeout share one timer per stream, re-armed once per heartbeat interval, never per
  write; a write costs no timer and no cancel scope (sse-starlette opened one around every write).
- While a stream waits for events on a socket that takes bytes, an event is written from the publisher's own turn
  (:meth:`FrameSource.write_through`, with :func:`~service.api.stream_host.socket_writer`): no task wakes, nothing
  is buffered. Only when the socket is full, or the stream is already awake, do events wait for its writer. A
  connection's second and later frames of one turn go out together when the turn ends (see ``socket_writer``);
  the stream's own writes send them first.
- A write carries everything the source has ready, and a heartbeat that falls due while events flow rides along.
- While the event loop is behind, a stream that receives events faster than it can write them one by one writes
  at most once per :data:`PACE_SECONDS` (:class:`WritePacer`): a write costs the same system call whether it
  carries one event or fifty.

While the stream waits for live events, a due heartbeat wakes it the way ``asyncio.timeout`` does: by cancelling
the waiting task and taking that cancellation back (``Task.uncancel``) once it arrives; a source says when its wait
may be interrupted so (:attr:`FrameSource.interruptible`). A paced stream is woken early the same way when half of
its buffer is pending, so pacing never makes a client that keeps up look slow. A write that has not finished
``send_timeout`` seconds after it began (checked at each heartbeat) is cancelled and ends the stream as
``stalled``; the response is then left unfinished, so the server drops the connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
from collections.abc import Callable
from typing import Protocol

import structlog
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from service.api.stream_host import HANDOFF, Handoff, SocketWriter, socket_writer

log = structlog.get_logger("service.sse")

PING = b": ping\n\n"
STALLED = "stalled"
PACE_SECONDS = 0.025
"""Under load, how often a stream may write; the events that arrive meanwhile go out together in one write."""
LAG_SECONDS = 0.002
"""A live event that waited longer than this for its stream to wake means the loop is behind: pace that stream."""


class WritePacer:
    """Shared by the streams of one application: a paced stream writes at most once per ``interval``.

    Its waits end on a grid of ``interval / 5`` (a timer wheel): one timer per occupied slot serves every stream
    due in it, and each stream waits on its own future, so cancelling one wait disturbs no other.
    """

    def __init__(self, interval: float = PACE_SECONDS, lag: float = LAG_SECONDS) -> None:
        self.interval = interval
        self.lag = lag
        self._slot = interval / 5
        self._slots: dict[int, list[asyncio.Future[None]]] = {}

    async def wait_until(self, when: float) -> None:
        """Return at the first slot at or after ``when`` (the loop's clock)."""
        loop = asyncio.get_running_loop()
        slot = math.ceil(when / self._slot)
        waiters = self._slots.get(slot)
        if waiters is None:
            waiters = self._slots[slot] = []
            loop.call_at(slot * self._slot, self._release, slot)
        waiter = loop.create_future()
        waiters.append(waiter)
        await waiter

    def _release(self, slot: int) -> None:
        for waiter in self._slots.pop(slot, ()):
            if not waiter.done():
                waiter.set_result(None)


class FrameSource(Protocol):
    """What a stream writes, and the account of it; the response calls these from the stream's tasks only."""

    def opening(self) -> bytes:
        """The first write (the ``connected`` frame)."""

    def opened(self) -> None:
        """The opening write went out."""

    @property
    def interruptible(self) -> bool:
        """True while :meth:`next_write` waits for live events only, so that cancelling the wait loses nothing."""

    async def next_write(self) -> bytes | None:
        """The bytes of the next write (one or more whole frames); None once the source has ended."""

    @property
    def events(self) -> int:
        """How many events the last :meth:`next_write` carried."""

    @property
    def waited(self) -> float:
        """How long (seconds) the oldest live event of the last :meth:`next_write` waited for it; 0 for stored ones."""

    def written(self) -> None:
        """The bytes :meth:`next_write` returned last went out."""

    def closing(self) -> bytes | None:
        """A last write once the source has ended, or None."""

    def notify_when_filling(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when half of the live events the source may hold are waiting (a paced stream then
        writes at once)."""

    def write_through(self, write: Callable[[bytes], bool]) -> None:
        """From now on, while the stream waits for live events, the source may write a new event's frame with
        ``write`` at once, from the publisher's turn, instead of returning it from :meth:`next_write`. ``write``
        returns True when the frame went out (the source accounts for it as for a write of its own), False when it
        could not go out at once (the source keeps the event for :meth:`next_write`). A source that cannot (a
        frame that takes its own turn to render) ignores this."""

    def gone(self) -> None:
        """The client left: the source should end (its pending :meth:`next_write` returns None)."""

    def finish(self, reason: str | None) -> None:
        """The stream is over (``reason`` is ``"stalled"`` when a write timed out, else None); called once."""


@functools.cache
def _raw_headers(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """The header lines of a stream: ``headers``, ``Connection: keep-alive`` and the content type."""
    head = Response(None, headers={**dict(headers), "Connection": "keep-alive"}, media_type="text/event-stream")
    return tuple((name, value) for name, value in head.raw_headers if name != b"content-length")


class EventStreamResponse(Response):
    """``text/event-stream`` from a :class:`FrameSource`, with ``: ping`` every ``heartbeat`` seconds.

    The content type is one of its header lines, not a ``media_type`` attribute: FastAPI would then describe the
    body in the OpenAPI document as a single string, which a stream of events is not (the route declares it).
    """

    def __init__(self, source: FrameSource, *, heartbeat: float, send_timeout: float,
                 pacer: WritePacer | None = None, headers: dict[str, str] | None = None) -> None:
        # Not Response.__init__: a body would give the response a Content-Length. The header lines are made once
        # for every stream with the same headers; each stream has only its own list of them.
        self.status_code = 200
        self.background = None
        self.raw_headers = list(_raw_headers(tuple((headers or {}).items())))
        self._source = source
        self._heartbeat = heartbeat
        self._send_timeout = send_timeout
        self._pacer = pacer
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._next_beat = 0.0
        self._parked = False
        self._pausing = False
        self._waking = False
        self._ping_due = False
        self._writing_since = 0.0
        self._stalled = False
        self._writer_ended = False
        self._socket: SocketWriter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                self._source.finish(None)
                return
        except BaseException:
            self._source.finish(None)
            raise
        handoff: Handoff | None = scope.get("extensions", {}).get(HANDOFF)
        if handoff is None:
            await self._carry_on(None, receive, send)
            return
        self._socket = socket_writer(handoff.send)
        if not handoff.enabled:
            await self._carry_on(None, receive, handoff.send)
        else:
            context = contextvars.copy_context()
            handoff.take(functools.partial(self._carry_on, context, receive, handoff.send, handoff.on_end),
                         functools.partial(context.run, self._source.finish, None))

    async def _carry_on(self, context: contextvars.Context | None, receive: Receive, send: Send,
                        on_end: list[Callable[[], None]] | None = None) -> None:
        """The stream after its head, until it ends; ``context``: the request's (when the host runs it)."""
        source = self._source
        reason: str | None = None
        try:
            loop = asyncio.get_running_loop()
            requester = asyncio.current_task()
            writer = self._writer = loop.create_task(self._pump(send, loop, requester), context=context)
            self._next_beat = loop.time() + self._heartbeat
            self._timer = loop.call_at(self._next_beat, self._beat)
            try:
                await self._watch(receive)
            except asyncio.CancelledError:
                # The writer ended without completing the response (it stalled or failed) and woke us so.
                if not self._writer_ended or (requester is not None and requester.uncancel() > 0):
                    writer.cancel()
                    raise
            finally:
                self._timer.cancel()
                if not writer.done():
                    source.gone()
                    self._filling()
                    await asyncio.wait([writer])
            try:
                writer.result()
            except asyncio.CancelledError:
                if not self._stalled:
                    raise
                reason = STALLED
            except Exception:
                if context is not None:
                    # Outside the framework's call now, so its error handler never sees this.
                    context.run(log.exception, "request_failed", path="stream")
                raise
        finally:
            if context is None:
                source.finish(reason)
            else:
                context.run(source.finish, reason)
                for step in on_end or ():
                    context.run(step)

    async def _pump(self, send: Send, loop: asyncio.AbstractEventLoop, requester: asyncio.Task[object] | None
                    ) -> None:
        try:
            await self._stream(send, loop)
        except BaseException:
            # The response is left unfinished, so the request's task would wait for a disconnect that never comes.
            self._writer_ended = True
            if requester is not None:
                requester.cancel()
            raise

    async def _stream(self, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        source = self._source
        pacer = self._pacer
        if pacer is not None:
            source.notify_when_filling(self._filling)
        await self._write(send, source.opening(), loop)
        source.opened()
        if self._socket is not None:
            source.write_through(self._socket.write)
        pacing = False
        last_write = 0.0
        while True:
            if pacing and pacer is not None and loop.time() < last_write + pacer.interval:
                await self._pause(pacer, last_write + pacer.interval)
            self._parked = True
            try:
                data = await source.next_write()
            except asyncio.CancelledError:
                # Woken for a heartbeat: take the cancellation back unless someone else cancelled too.
                if not self._waking or self._uncancel():
                    raise
                data = b""
            finally:
                self._parked = False
                self._waking = False
            if data is None:
                break
            if data:
                last_write = loop.time()
                await self._write(send, data + PING if self._ping_due else data, loop)
                source.written()
                if pacer is not None:
                    # Paced from the first event that waited too long for its write (the loop is behind), for as
                    # long as a turn finds more than one event: a stream that gets fewer gains nothing by waiting.
                    pacing = source.events > 1 if pacing else source.waited > pacer.lag
            elif self._ping_due:
                await self._write(send, PING, loop)
            else:
                continue
            self._ping_due = False
        last = source.closing()
        if last is not None:
            await self._write(send, last, loop)
        if self._socket is not None:
            self._socket.end()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _write(self, send: Send, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        if self._socket is not None:
            self._socket.flush()  # what write-through held back in this turn goes first
        self._writing_since = loop.time()
        await send({"type": "http.response.body", "body": data, "more_body": True})
        self._writing_since = 0.0

    async def _pause(self, pacer: WritePacer, until: float) -> None:
        self._pausing = True
        try:
            await pacer.wait_until(until)
        except asyncio.CancelledError:
            # Woken early (the buffer is filling up): take the cancellation back unless someone else cancelled too.
            if not self._waking or self._uncancel():
                raise
        finally:
            self._pausing = False
            self._waking = False

    def _filling(self) -> None:
        """Half of the stream's buffer is pending (or the stream is ending): a paced stream goes on now rather than
        at its next turn."""
        writer = self._writer
        if self._pausing and not self._waking and writer is not None and not writer.done():
            self._waking = True
            writer.cancel()

    def _beat(self) -> None:
        """Every ``heartbeat`` seconds: cut a write that has stalled, else make a ping due (and wake the stream if it
        is waiting for events)."""
        writer = self._writer
        if writer is None or writer.done():
            return
        now = self._next_beat
        if self._writing_since and now - self._writing_since >= self._send_timeout:
            self._stalled = True
            writer.cancel()
            return
        self._ping_due = True
        self._wake_writer()
        loop = asyncio.get_running_loop()
        # From the previous deadline, not from now: a late timer does not push every later heartbeat back.
        self._next_beat = max(now + self._heartbeat, loop.time())
        self._timer = loop.call_at(self._next_beat, self._beat)

    def _wake_writer(self) -> None:
        """Interrupt the writer's wait for events (nothing is lost: they stay pending)."""
        writer = self._writer
        if self._parked and not self._waking and self._source.interruptible and writer is not None:
            self._waking = True
            writer.cancel()

    def _uncancel(self) -> bool:
        """Take back one cancellation of our own; True when others remain (someone else cancelled the task too)."""
        assert self._writer is not None
        return self._writer.uncancel() > 0

    async def _watch(self, receive: Receive) -> None:
        """Wait until the client leaves or the response is complete (the server then says ``http.disconnect`` too),
        and end the source."""
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self._source.gone()
                self._filling()
                return
