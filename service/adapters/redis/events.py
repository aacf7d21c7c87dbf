"""The event log on Redis Streams: one stream per session, one reader per replica for live delivery.

- **Ids.** One Lua script takes the next number of a counter shared by every session (so ids increase within a
  session and continue above those of deleted sessions, as in SQLite) and adds the entry under the stream id
  ``{id}-0``: the API's integer id *is* the stream id, and a replay is one ``XRANGE`` after it. The JSON is made
  before the id exists, with ``"id":""`` in it; the id is put in when the entry is read (one string replace).
- **Retention.** ``MAXLEN`` (exact) keeps the newest ``retention`` entries of a stream, and every append sets the
  stream to expire ``ttl_seconds`` after its last event.
- **Live delivery.** One reader per replica (one connection, whatever the number of clients) follows, with a
  blocking ``XREAD``, the streams of the sessions this replica has subscribers for, and hands each entry to the
  in-process broker, which fans it out. A session's first subscriber registers it with the reader at the
  stream's current last id; ``Subscription.ready`` waits for that, so a replay read after it misses nothing. A
  per-replica wake-up stream interrupts the blocking read when the set of sessions changes.
- **Redis outage.** Appends that cannot be written wait in a bounded backlog, in order, and are written when Redis
  answers again (they get their ids then; the returned event has id 0). When the backlog is full, appends raise
  :class:`Unavailable` (the task fails with that reason), but a task's last event is always kept. Open
  subscriptions are closed (reason ``redis_unavailable``) so their clients reconnect, to another replica or once
  Redis is back, and replay from their last id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis

from service.adapters.broker.memory import BufferedSubscription, MemoryBroker
from service.adapters.jsoncodec import dumps_text
from service.adapters.redis.client import BLOCK_SECONDS, UNREACHABLE, ControlBus, Keys, reachable, stop
from service.domain.errors import Unavailable
from service.domain.events import TERMINAL_EVENT_TYPES, Event, StoredEvent

log = structlog.get_logger("service.redis.events")

REDIS_UNAVAILABLE = "redis_unavailable"
SESSION_DELETED = "session_deleted"
ID_SLOT = '"id":""'
"""Where the id goes in a stored event's JSON (the envelope's ``id`` is its second key)."""

READ_COUNT = 1_000
"""Entries taken from each stream per read."""

_APPEND = """
-- KEYS: stream, id counter; ARGV: task id, event type, JSON, appended at, maxlen, ttl seconds
local id = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], id .. '-0', 't', ARGV[1], 'e', ARGV[2], 'd', ARGV[3], 'a', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return id
"""


def _entry_id(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


def _stored(session_id: str, stream_id: str, fields: dict[str, str]) -> StoredEvent:
    event_id = _entry_id(stream_id)
    data = fields["d"].replace(ID_SLOT, f'"id":"{event_id}"', 1)
    return StoredEvent.from_json(event_id, session_id, fields["t"], fields["e"], data,
                                 appended_at=float(fields.get("a") or 0.0))


class FollowedSubscription:
    """A broker subscription that is ``ready`` once the replica's reader follows its session's stream."""

    __slots__ = ("_registration", "_subscription")

    def __init__(self, subscription: BufferedSubscription, registration: asyncio.Future[None] | None) -> None:
        self._subscription = subscription
        self._registration = registration

    @property
    def last_id(self) -> int:
        return self._subscription.last_id

    @last_id.setter
    def last_id(self, value: int) -> None:
        self._subscription.last_id = value

    @property
    def offered(self) -> int:
        return self._subscription.offered

    @property
    def close_reason(self) -> str | None:
        return self._subscription.close_reason

    @property
    def dropped(self) -> int:
        return self._subscription.dropped

    @property
    def pending(self) -> int:
        return self._subscription.pending

    async def ready(self) -> None:
        """Raises :class:`Unavailable` when Redis could not be asked where the stream stands."""
        if self._registration is not None:
            with reachable("follow the session"):
                await asyncio.shield(self._registration)

    async def next_batch(self) -> list[StoredEvent]:
        return await self._subscription.next_batch()

    def notify_when_filling(self, callback: Callable[[], None] | None) -> None:
        self._subscription.notify_when_filling(callback)

    def write_through(self, offer: Callable[[bytes], bool] | None,
                      taken: Callable[[StoredEvent, int], None] | None = None) -> None:
        self._subscription.write_through(offer, taken)

    def close(self, reason: str = "closed") -> None:
        self._subscription.close(reason)


class RedisEventLog:
    """``EventLog`` on Redis Streams (see the module docstring). Call :meth:`start` once the loop runs."""

    def __init__(self, redis: Redis, reader: Redis, bus: ControlBus, replica: str, *, retention: int,
                 ttl_seconds: int, backlog_limit: int, keys: Keys | None = None) -> None:
        if retention < 1:
            raise ValueError("retention must be at least 1")
        # Any: redis-py types its replies as bytes | str whatever decode_responses says; ours are str.
        self._redis: Any = redis
        self._reader: Any = reader
        self._bus = bus
        self._keys = keys or Keys()
        self._wake_key = self._keys.wake(replica)
        self._retention = retention
        self._ttl = ttl_seconds
        self._backlog_limit = backlog_limit
        self._append = redis.register_script(_APPEND)
        self._broker = MemoryBroker()
        self._cursors: dict[str, str] = {}
        """Session id -> the last stream id the reader handed on, for every session followed here."""
        self._registering: dict[str, asyncio.Future[None]] = {}
        self._backlog: deque[Event] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._job: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._up = True
        self._closing = False
        bus.on("session_deleted", lambda message: self._broker.close_session(str(message.get("session_id")),
                                                                              SESSION_DELETED))
        # A deletion announced while the channel was down would go unseen: end every stream, clients resume.
        bus.on_lost(lambda: self._broker.close_all(REDIS_UNAVAILABLE))

    @property
    def backlog(self) -> int:
        """Events waiting for Redis to come back."""
        return len(self._backlog)

    def start(self) -> None:
        self._job = asyncio.create_task(self._follow(), name="redis event reader")

    # --- writing ------------------------------------------------------------------------------------------------

    async def append(self, event: Event) -> StoredEvent:
        if self._backlog:
            return self._hold(event)
        try:
            return await self._write(event)
        except UNREACHABLE as exc:
            log.warning("event_write_deferred", error=type(exc).__name__, session_id=event.session_id)
            return self._hold(event)

    async def _write(self, event: Event) -> StoredEvent:
        data = dumps_text(event.to_dict(""))
        appended_at = time.time()
        event_id = int(await self._append(
            keys=[self._keys.events(event.session_id), self._keys.event_ids],
            args=[event.task_id, event.event_type, data, repr(appended_at), self._retention, self._ttl]))
        return StoredEvent.from_json(event_id, event.session_id, event.task_id, event.event_type,
                                     data.replace(ID_SLOT, f'"id":"{event_id}"', 1), appended_at=appended_at)

    def _hold(self, event: Event) -> StoredEvent:
        """Keep the event for a later write; a full backlog refuses it unless it ends its task."""
        if len(self._backlog) >= self._backlog_limit and event.event_type not in TERMINAL_EVENT_TYPES:
            raise Unavailable(f"Redis has been unavailable for {len(self._backlog)} events "
                              "(ALEX_REDIS_OUTAGE_BUFFER_EVENTS); the task cannot go on")
        self._backlog.append(event)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="redis event backlog")
        return StoredEvent.from_json(0, event.session_id, event.task_id, event.event_type,
                                     dumps_text(event.to_dict("")))

    async def _flush(self) -> None:
        delay = 0.1
        while self._backlog:
            try:
                await self._write(self._backlog[0])
            except UNREACHABLE:
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            self._backlog.popleft()
            if not self._backlog:
                log.info("event_backlog_written")

    # --- reading ------------------------------------------------------------------------------------------------

    async def read_after(self, session_id: str, after_id: int, limit: int) -> list[StoredEvent]:
        if limit <= 0:
            return []
        start = "-" if after_id <= 0 else f"({after_id}-0"
        with reachable("read the events"):
            entries = await self._redis.xrange(self._keys.events(session_id), start, "+", count=limit)
        return [_stored(session_id, stream_id, fields) for stream_id, fields in entries]

    def subscribe(self, session_id: str, buffer_size: int) -> FollowedSubscription:
        subscription = self._broker.subscribe(session_id, buffer_size)
        if not self._up:
            subscription.close(REDIS_UNAVAILABLE)
            return FollowedSubscription(subscription, None)
        registration: asyncio.Future[None] | None = None
        if session_id not in self._cursors:
            registration = self._registering.get(session_id)
            if registration is None:
                registration = asyncio.get_running_loop().create_future()
                self._registering[session_id] = registration
                job = asyncio.create_task(self._register(session_id, registration), name=f"follow {session_id}")
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
        return FollowedSubscription(subscription, registration)

    async def _register(self, session_id: str, registration: asyncio.Future[None]) -> None:
        try:
            with reachable("follow the session"):
                last = await self._redis.xrevrange(self._keys.events(session_id), "+", "-", count=1)
                self._cursors[session_id] = last[0][0] if last else "0-0"
                await self._wake()
        except Exception as exc:
            if not registration.done():
                registration.set_exception(exc)
            self._broker.close_session(session_id, REDIS_UNAVAILABLE)
        else:
            if not registration.done():
                registration.set_result(None)
        finally:
            self._registering.pop(session_id, None)
            # Nobody may wait for it (the subscriber left): do not let asyncio report the exception.
            if registration.done() and not registration.cancelled():
                registration.exception()

    async def _wake(self) -> None:
        """Make the reader's blocking read return (its set of sessions changed, or it is to stop)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._wake_key, {"wake": "1"}, maxlen=10, approximate=False)
            pipe.expire(self._wake_key, 3600)
            await pipe.execute()

    async def _follow(self) -> None:
        wake_cursor = "$"
        delay = 0.1
        while not self._closing:
            # Sessions whose subscribers have all left are no longer followed.
            for session_id in [s for s in self._cursors if not self._broker.subscriber_count(s)]:
                del self._cursors[session_id]
            streams = {self._wake_key: wake_cursor}
            keys: dict[str, str] = {}
            for session_id, cursor in self._cursors.items():
                key = self._keys.events(session_id)
                streams[key] = cursor
                keys[key] = session_id
            try:
                if not self._up:
                    # Answer new subscribers as soon as Redis does, not after a whole blocking read.
                    await self._reader.ping()
                    self._up = True
                    log.info("redis_events_back")
                    continue
                reply: Any = await self._reader.xread(streams, count=READ_COUNT, block=int(BLOCK_SECONDS * 1000))
            except asyncio.CancelledError:
                raise
            except UNREACHABLE as exc:
                self._lost(exc)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                wake_cursor = "$"
                continue
            delay = 0.1
            for key, entries in reply or ():
                if key == self._wake_key:
                    wake_cursor = entries[-1][0]
                    continue
                followed = keys.get(key)
                if followed is None or followed not in self._cursors:
                    continue
                for stream_id, fields in entries:
                    self._broker.publish(_stored(followed, stream_id, fields))
                self._cursors[followed] = entries[-1][0]

    def _lost(self, exc: BaseException) -> None:
        if self._up:
            log.warning("redis_events_unavailable", error=type(exc).__name__,
                        streams=self._broker.subscriber_count())
        self._up = False
        self._cursors.clear()
        self._broker.close_all(REDIS_UNAVAILABLE)

    # --- the rest of the port -----------------------------------------------------------------------------------

    async def delete_session(self, session_id: str) -> None:
        with reachable("delete the events"):
            await self._redis.delete(self._keys.events(session_id))
        self._broker.close_session(session_id, SESSION_DELETED)
        with contextlib.suppress(Unavailable):
            await self._bus.publish("session_deleted", session_id=session_id)

    def close_subscriptions(self, reason: str) -> None:
        self._broker.close_all(reason)

    async def close(self) -> None:
        """Stop following; give the backlog one last chance to be written (what is left is logged as lost)."""
        job, self._job = self._job, None
        if job is not None:
            # Woken, not cancelled: a blocking read cancelled while its reply arrives leaves redis-py waiting for
            # the socket's timeout. A reader Redis cannot wake (it is away) is not reading: cancel that one.
            self._closing = True
            with contextlib.suppress(*UNREACHABLE, Unavailable):
                await self._wake()
            await asyncio.wait([job], timeout=1.0)
            await stop(job)
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            await asyncio.wait([flusher], timeout=2.0)
            await stop(flusher)
        if self._backlog:
            log.error("events_lost", count=len(self._backlog), reason="Redis was unavailable at shutdown")
        self._broker.close_all("closed")
