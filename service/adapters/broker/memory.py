"""In-process fan-out of live events to the subscribers of each session, through bounded buffers.

This is the hot path of delivery: one ``publish`` per event reaches every subscriber of that session (and only
those), doing O(1) work for each: one list append and, when its reader is parked, one wake-up. Nothing is encoded
here; every subscriber receives the same :class:`StoredEvent`, whose SSE frame was made once at append. A reader
that can take an event on the spot (a stream whose socket is free, see :meth:`BufferedSubscription.write_through`)
gets it within ``publish`` instead, with neither the append nor the wake-up: one call per subscriber, and one call
per event for the account of all of them.

Everything runs on one event loop: ``publish``, ``subscribe``, ``close`` and ``next_batch`` must be called from the
loop that owns the broker (no locks, no thread hops).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.domain.events import StoredEvent

SLOW_CLIENT = "slow_client"
"""The ``close_reason`` of a subscription whose buffer overflowed."""


class BufferedSubscription:
    """One reader's live events of one session, at most ``buffer_size`` pending (implements ``Subscription``).

    ``next_batch`` waits until at least one event is pending or the subscription is closed, then returns every
    pending event in id order.

    Closing, the two ways:

    - ``close(reason)`` (the reader leaves, the server drains): events already pending are still returned by the
      following ``next_batch`` calls; once they are drained, ``next_batch`` returns ``[]`` at once and for ever.
    - overflow: when ``buffer_size`` events are pending and one more arrives, all pending events and the new one
      are dropped and counted in ``dropped``, ``close_reason`` becomes ``"slow_client"`` and the subscription
      closes; ``next_batch`` returns ``[]`` at once. The reader recovers what it missed from the event log (its
      last delivered id is the resume point), which is why nothing of the lost run is kept: a partial batch would
      only make the reader write events it must then re-read.

    Either way the subscription leaves its broker, so no further event reaches it. One reader at a time: a second
    concurrent ``next_batch`` raises ``RuntimeError``.

    A reader that takes its events in batches on purpose (a stream pacing its writes under load) can ask to hear
    when half the buffer is pending (:meth:`notify_when_filling`), so that pacing never turns a reader that keeps
    up into one cut off as slow. A reader that can take an event at once while it waits (:meth:`write_through`) is
    offered it before it is buffered.
    """

    __slots__ = ("_armed", "_buffer_size", "_close_reason", "_closed", "_dropped", "_filling_at", "_offer",
                 "_offered", "_on_close", "_on_filling", "_pending", "_taken", "_waiter", "last_id", "session_id")

    def __init__(self, session_id: str, buffer_size: int,
                 on_close: Callable[[BufferedSubscription], None] | None = None) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.session_id = session_id
        self.last_id = 0
        """The id of the last event the reader had (it sets it; an offer that takes an event moves it)."""
        self._offered = 0
        self._buffer_size = buffer_size
        self._on_close = on_close
        # A list, not a deque: the reader takes the whole run at once by swapping lists, so no copy is made, and
        # appends are amortised O(1) just the same.
        self._pending: list[StoredEvent] = []
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._close_reason: str | None = None
        self._dropped = 0
        self._on_filling: Callable[[], None] | None = None
        self._filling_at = max(1, buffer_size // 2)
        self._offer: Callable[[bytes], bool] | None = None
        self._taken: Callable[[StoredEvent, int], None] | None = None
        self._armed: Callable[[bytes], bool] | None = None
        """``_offer`` while the reader waits with nothing pending, else None: what ``publish`` looks at."""

    @property
    def close_reason(self) -> str | None:
        """None while open; the reason given to ``close``, or ``"slow_client"`` after an overflow."""
        return self._close_reason

    @property
    def dropped(self) -> int:
        """Events this subscription lost to overflow."""
        return self._dropped

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Events waiting for the reader."""
        return len(self._pending)

    @property
    def offered(self) -> int:
        """Events the offer took (see :meth:`write_through`)."""
        return self._offered

    async def ready(self) -> None:
        """In-process delivery starts at ``subscribe``: nothing to wait for."""

    async def next_batch(self) -> list[StoredEvent]:
        if not self._pending and not self._closed:
            if self._waiter is not None:
                raise RuntimeError("a subscription has one reader at a time")
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            self._armed = self._offer
            try:
                await waiter
            finally:
                self._waiter = self._armed = None
        batch, self._pending = self._pending, []
        return batch

    def notify_when_filling(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` each time half of the buffer is pending (None: stop)."""
        self._on_filling = callback

    def write_through(self, offer: Callable[[bytes], bool] | None,
                      taken: Callable[[StoredEvent, int], None] | None = None) -> None:
        """While the reader waits in :meth:`next_batch` with nothing pending, hand the frame of each new event
        whose id is above :attr:`last_id` to ``offer`` first, from within ``publish``; it returns True when it took
        the event (which then is not buffered, and wakes nobody: ``last_id`` becomes its id and :attr:`offered`
        counts it), False to have it buffered as usual. None: stop. An event at or below ``last_id`` (a live copy of
        one a replay gave already) is buffered without an offer, for the reader to skip.

        ``taken``, when given, hears of what ``offer`` took once per event for all the subscriptions that share it:
        ``taken(event, count)``, once ``publish`` has offered the event to every subscription of its session. It is
        the account of the writes (metrics), kept out of the walk.

        Events reach the reader in order either way: an event is offered only when none is pending, and once one is
        buffered (the reader is being woken) the next ones are buffered behind it until the reader has taken them
        all and waits again. ``offer`` runs inside ``publish``'s walk over the session's subscriptions, so it must
        not subscribe, close or unsubscribe anything itself.
        """
        self._offer = offer
        self._taken = taken if offer is not None else None
        waiter = self._waiter
        waiting = waiter is not None and not waiter.done() and not self._pending
        self._armed = offer if waiting and not self._closed else None

    def close(self, reason: str = "closed") -> None:
        """Stop receiving events; pending ones stay readable (see the class docstring). Idempotent."""
        if self._mark_closed(reason) and self._on_close is not None:
            self._on_close(self)

    def _deliver(self, event: StoredEvent) -> bool:
        """Queue one event the offer did not take (broker only). False when this overflowed it: the caller then
        unsubscribes it."""
        if self._closed:
            return True
        pending = self._pending
        if len(pending) >= self._buffer_size:
            self._dropped += len(pending) + 1
            self._pending = []
            self._mark_closed(SLOW_CLIENT)
            return False
        pending.append(event)
        self._armed = None  # the next events wait behind this one
        waiter = self._waiter
        # Only the first event after the reader parked costs a wake-up; later ones find the future done.
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif len(pending) == self._filling_at and self._on_filling is not None:
            self._on_filling()
        return True

    def _mark_closed(self, reason: str) -> bool:
        if self._closed:
            return False
        self._closed = True
        self._close_reason = reason
        self._offer = self._armed = self._on_filling = self._taken = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True


class MemoryBroker:
    """Live events of each session to that session's subscribers, within one process.

    ``publish`` never waits and never fails because of a reader: a reader that falls ``buffer_size`` events behind
    is cut off (see :class:`BufferedSubscription`). Events published while nobody subscribes are not kept; the
    event log is what replays them.
    """

    def __init__(self) -> None:
        self._by_session: dict[str, tuple[BufferedSubscription, ...]] = {}
        """Each session's subscriptions, in the order they came (the order of delivery), as a tuple made again when
        one comes or goes: what ``publish`` walks once per event is a compact array, and a copy the walk may
        outlive."""

    def publish(self, event: StoredEvent) -> None:
        """Hand ``event`` to every open subscription of ``event.session_id``."""
        subscribers = self._by_session.get(event.session_id)
        if not subscribers:
            return
        overflowed: list[BufferedSubscription] | None = None
        account: Callable[[StoredEvent, int], None] | None = None
        taken = 0
        event_id, frame = event.id, event.frame
        for subscription in subscribers:
            offer = subscription._armed
            if offer is not None and event_id > subscription.last_id and offer(frame):
                # The reader's own account, kept here: an offer costs one call, to the writer itself.
                subscription.last_id = event_id
                subscription._offered += 1
                # What was written through is accounted for once per event (every stream shares one account).
                taker = subscription._taken
                if taker is account or taker == account:
                    taken += 1
                elif taker is not None:
                    if account is not None:
                        account(event, taken)
                    account, taken = taker, 1
                continue
            if not subscription._deliver(event):
                # Removed after the walk, which each removal would copy again.
                if overflowed is None:
                    overflowed = []
                overflowed.append(subscription)
        if account is not None:
            account(event, taken)
        if overflowed is not None:
            for subscription in overflowed:
                self._remove(subscription)

    def subscribe(self, session_id: str, buffer_size: int) -> BufferedSubscription:
        """A new subscription to the events of ``session_id`` published from now on."""
        subscription = BufferedSubscription(session_id, buffer_size, self._remove)
        self._by_session[session_id] = (*self._by_session.get(session_id, ()), subscription)
        return subscription

    def close_all(self, reason: str) -> None:
        """Close every open subscription with ``reason``; their readers drain what is pending, then end."""
        by_session, self._by_session = self._by_session, {}
        for subscribers in by_session.values():
            for subscription in subscribers:
                subscription.close(reason)

    def close_session(self, session_id: str, reason: str) -> None:
        """Close every subscription of one session (it was deleted: its id may be claimed anew by anyone)."""
        for subscription in self._by_session.pop(session_id, ()):
            subscription.close(reason)

    def subscriber_count(self, session_id: str | None = None) -> int:
        """Open subscriptions of one session, or of all sessions when ``session_id`` is None."""
        if session_id is not None:
            return len(self._by_session.get(session_id, ()))
        return sum(len(subscribers) for subscribers in self._by_session.values())

    def _remove(self, subscription: BufferedSubscription) -> None:
        session_id = subscription.session_id
        subscribers = self._by_session.get(session_id, ())
        if subscription not in subscribers:
            return
        rest = tuple(other for other in subscribers if other is not subscription)
        if rest:
            self._by_session[session_id] = rest
        else:
            del self._by_session[session_id]
