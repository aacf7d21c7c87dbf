"""SessionService: the caller's sessions: list, read, read events, follow, delete."""

from __future__ import annotations

import secrets

from service.app.access import Principal, claim_session, owned_session, readable_session, streamable_session
from service.app.ports import ClientStreams, EventLog, SessionStore
from service.app.runner import TaskRunner
from service.app.stream import SessionFeed
from service.app.workspaces import Workspaces
from service.domain.errors import LimitExceeded, NotFound, Unavailable
from service.domain.events import StoredEvent
from service.domain.models import Session, new_session_id


class StreamsFull(Unavailable):
    """This process holds as many streams as it may (``ALEX_MAX_STREAMS``): the client should try another replica."""


class LocalClientStreams:
    """``ClientStreams`` within one process."""

    def __init__(self) -> None:
        self._open: dict[str, set[str]] = {}

    async def acquire(self, subject: str, stream_id: str, limit: int) -> None:
        streams = self._open.setdefault(subject, set())
        if len(streams) >= limit:
            raise LimitExceeded(f"{len(streams)} streams are open for this client (ALEX_MAX_STREAMS_PER_CLIENT)",
                                retry_after=5)
        streams.add(stream_id)

    def release(self, subject: str, stream_id: str) -> None:
        streams = self._open.get(subject)
        if streams is None:
            return
        streams.discard(stream_id)
        if not streams:
            del self._open[subject]


class StreamQuota:
    """Open streams per subject (``ALEX_MAX_STREAMS_PER_CLIENT``, counted by ``per_subject``, shared by the
    replicas when it is) and in this process (``ALEX_MAX_STREAMS``), capped."""

    def __init__(self, per_client: int, total: int, per_subject: ClientStreams | None = None) -> None:
        self._per_client = per_client
        self._per_subject = per_subject if per_subject is not None else LocalClientStreams()
        self.limit = total
        self.total = 0

    async def acquire(self, subject: str) -> str:
        """Take a place; returns the stream's id, for :meth:`release`."""
        if self.total >= self.limit:
            raise StreamsFull(f"this server holds its maximum of {self.limit} streams (ALEX_MAX_STREAMS); "
                              "retry shortly or on another replica")
        stream_id = secrets.token_hex(8)
        # Counted before the await: concurrent opens must not all pass the check.
        self.total += 1
        try:
            await self._per_subject.acquire(subject, stream_id, self._per_client)
        except BaseException:
            self.total -= 1
            raise
        return stream_id

    def release(self, subject: str, stream_id: str) -> None:
        self.total -= 1
        self._per_subject.release(subject, stream_id)


class SessionService:
    def __init__(
        self,
        store: SessionStore,
        events: EventLog,
        runner: TaskRunner,
        workspaces: Workspaces,
        *,
        stream_buffer_size: int,
        max_streams_per_client: int,
        max_streams: int = 10_000,
        client_streams: ClientStreams | None = None,
    ) -> None:
        self._store = store
        self._events = events
        self._runner = runner
        self._workspaces = workspaces
        self._buffer_size = stream_buffer_size
        self.streams = StreamQuota(max_streams_per_client, max_streams, client_streams)

    async def create(self, principal: Principal) -> Session:
        """A new, empty session owned by the caller, under a fresh random id (the web UI's "New session")."""
        return await claim_session(self._store, principal, new_session_id())

    async def ids(self, principal: Principal) -> list[str]:
        return await self._store.list_sessions(None if principal.is_admin else principal.subject)

    async def get(self, principal: Principal, session_id: str) -> Session:
        return await readable_session(self._store, principal, session_id)

    async def events(self, principal: Principal, session_id: str, after: int, limit: int) -> list[StoredEvent]:
        await readable_session(self._store, principal, session_id)
        return await self._events.read_after(session_id, after, limit)

    async def follow(self, principal: Principal, session_id: str, after: int) -> SessionFeed:
        """A feed of the session's events after ``after``; counts against the caller's stream cap until closed.

        The caller must call :meth:`unfollow` when the feed is done.
        """
        session = await streamable_session(self._store, principal, session_id)
        place = await self.streams.acquire(principal.subject)
        try:
            feed = SessionFeed(self._events, session_id, after, self._buffer_size)
        except BaseException:
            self.streams.release(principal.subject, place)
            raise
        feed.place = place
        try:
            await feed.ready()
            # Checked again once subscribed: a delete that finished meanwhile closed the subscriptions it found,
            # not this one, and the id may already be someone else's.
            current = await self._store.get_session(session_id)
            if current is None or current.owner != session.owner or current.created_at != session.created_at:
                raise NotFound(f"session {session_id!r} not found")
        except BaseException:
            self.unfollow(principal, feed)
            raise
        return feed

    def unfollow(self, principal: Principal, feed: SessionFeed) -> None:
        """Close the feed and give its place back; safe to call more than once."""
        if feed.released:
            return
        feed.released = True
        feed.close()
        self.streams.release(principal.subject, feed.place)

    async def delete(self, principal: Principal, session_id: str) -> None:
        """The session, its tasks (a running one is cancelled first), its events and its workspace."""
        await owned_session(self._store, principal, session_id)
        await self._runner.cancel_session(session_id, "the session was deleted")
        # The store forgets the session before the log closes its streams: a stream that subscribes in between
        # finds the session gone when it checks again (see follow).
        await self._store.delete_session(session_id)
        await self._events.delete_session(session_id)
        await self._workspaces.remove(session_id)
