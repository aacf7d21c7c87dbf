"""A session's events for one reader: what is stored after the reader's last id, then the live ones.

The subscription is opened before the stored events are read, so an event appended meanwhile is in one or the
other (or both: the live copy of a replayed event is skipped by id). No gap, no duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import structlog

from service.app.ports import STORE_UNAVAILABLE, EventLog
from service.domain.errors import Unavailable
from service.domain.events import TERMINAL_EVENT_TYPES, Event, StoredEvent

REPLAY_PAGE = 500

log = structlog.get_logger("service.sse")


class LogSink:
    """The engine's :class:`~service.domain.engine.EventSink`: every event goes into the log (which fans it out).

    Appending never suspends. A stream waiting with nothing pending writes each event from the append itself;
    one that is busy buffers it and needs a turn of the loop to write. So that a tool printing thousands of lines
    cannot fill a busy reader's buffer before it gets that turn, the sink lets the loop run once ``burst`` events
    went in within one turn. The engine's own events mostly come a few to a turn (a model or a tool call comes in
    between), and pay no extra turn at all. ``burst``: at most a quarter of the streams' buffer, so that a reader
    cut off as slow is one that really is (see :func:`emit_burst`).
    """

    def __init__(self, log: EventLog, burst: int = 1) -> None:
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self._log = log
        self._burst = burst
        self._in_turn = 0
        """Events appended in this turn of the loop; set back to 0 by a callback the turn's first one schedules."""

    async def emit(self, event: Event) -> None:
        await self._log.append(event)
        count = self._in_turn
        if count == 0:
            asyncio.get_running_loop().call_soon(self._next_turn)
        self._in_turn = count + 1
        if count + 1 >= self._burst:
            await asyncio.sleep(0)  # _next_turn runs first: it was scheduled before this task's wake-up

    def _next_turn(self) -> None:
        self._in_turn = 0


def emit_burst(stream_buffer_size: int) -> int:
    """The events a task may emit in one turn of the loop, for streams that buffer ``stream_buffer_size``."""
    return max(1, stream_buffer_size // 4)


class HoldingSink:
    """Passes every event on at once but the one that ends the task, which it keeps in ``held``.

    The runner appends the held event only once the task's outcome is stored and its session free, so that a
    client acting on ``task_complete`` (reading the task, submitting the next one) finds it finished.
    """

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink
        self.held: Event | None = None

    async def emit(self, event: Event) -> None:
        if event.event_type in TERMINAL_EVENT_TYPES:
            self.held = event
            return
        await self._sink.emit(event)


class SessionFeed:
    """Iterate to get batches of events; ``close_reason`` says why the feed ended (``slow_client``, ``draining``...).

    Where the reader stands (:attr:`last_id`) is kept by its subscription, which needs it for every event it
    offers to the stream's writer: an event written through costs the feed nothing.
    """

    __slots__ = ("_delivered", "_log", "_session_id", "_subscription", "live", "place", "released", "replayed")

    def __init__(self, log: EventLog, session_id: str, after_id: int, buffer_size: int) -> None:
        self._log = log
        self._session_id = session_id
        self._subscription = log.subscribe(session_id, buffer_size)
        self._subscription.last_id = after_id
        self.replayed = 0
        self._delivered = 0
        """Live events :meth:`next` gave (those written through are the subscription's ``offered``)."""
        self.released = False
        self.place = ""
        """The stream's place in its subject's quota (set by the session service)."""
        self.live = False
        """True once the stored events are replayed and the feed follows live ones."""

    @property
    def last_id(self) -> int:
        """The id of the last event the reader had: where a reconnect resumes."""
        return self._subscription.last_id

    @property
    def delivered(self) -> int:
        """Live events the reader had, from :meth:`next` or written through."""
        return self._delivered + self._subscription.offered

    @property
    def close_reason(self) -> str | None:
        return self._subscription.close_reason

    @property
    def dropped(self) -> int:
        return self._subscription.dropped

    @property
    def pending(self) -> int:
        """Live events received but not yet taken by the reader."""
        return self._subscription.pending

    async def ready(self) -> None:
        """Wait until live events reach the feed (see ``Subscription.ready``); before iterating."""
        await self._subscription.ready()

    def close(self, reason: str = "closed") -> None:
        self._subscription.close(reason)

    def notify_when_filling(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when half of the live buffer is pending (see :meth:`Subscription.notify_when_filling`)."""
        self._subscription.notify_when_filling(callback)

    def write_through(self, write: Callable[[bytes], bool] | None,
                      written: Callable[[StoredEvent, int], None] | None = None) -> None:
        """While the reader waits for live events, write each new one's frame with ``write`` at once (see
        :meth:`Subscription.write_through`); when it returns True the event counts as delivered, else it waits for
        :meth:`next` as usual. ``written(event, streams)`` hears of the writes once per event, for every feed that
        shares it. None: stop. (An event the replay gave already is not offered: its id is not above ``last_id``.)"""
        self._subscription.write_through(write, written)

    async def next(self) -> list[StoredEvent]:
        """The next events for the reader, oldest first: a page of stored ones while the replay lasts, then every
        live one pending (waiting for one); ``[]`` once the feed has ended, also when the stored events cannot be
        read for now (``close_reason`` :data:`~service.app.ports.STORE_UNAVAILABLE`).

        Once :attr:`live` is true, a call only waits for live events: cancelling it then loses nothing (they stay
        pending for the next call).
        """
        subscription = self._subscription
        if not self.live:
            try:
                page = await self._log.read_after(self._session_id, subscription.last_id, REPLAY_PAGE)
            except Unavailable as exc:
                # Skipping what cannot be read would leave a hole the client never hears of: the feed ends
                # instead, and its reader resumes from its last id (here or on another replica).
                log.warning("event_replay_failed", session_id=self._session_id, after_id=subscription.last_id,
                            error=str(exc))
                subscription.close(STORE_UNAVAILABLE)
                return []
            if len(page) < REPLAY_PAGE:
                self.live = True
            if page:
                subscription.last_id = page[-1].id
                self.replayed += len(page)
                return page
        while True:
            batch = await subscription.next_batch()
            if not batch:
                return batch
            last = subscription.last_id
            # A live copy of an event the replay already gave is skipped by id.
            fresh = batch if batch[0].id > last else [e for e in batch if e.id > last]
            if fresh:
                subscription.last_id = fresh[-1].id
                self._delivered += len(fresh)
                return fresh

    async def batches(self) -> AsyncGenerator[list[StoredEvent], None]:
        """:meth:`next` until the feed ends, as an iterator; closing it closes the feed."""
        try:
            while batch := await self.next():
                yield batch
        finally:
            self._subscription.close("client_gone" if self.close_reason is None else self.close_reason)
