"""Who may touch which session: the owner, and for reading also an admin. Nobody else learns that it exists."""

from __future__ import annotations

from dataclasses import dataclass

from service.app.ports import SessionStore
from service.domain.errors import NotFound
from service.domain.models import Session, is_valid_session_id

SCOPES = ("tasks:write", "sessions:read", "sessions:write", "admin")
DEFAULT_SCOPES = ("tasks:write", "sessions:read", "sessions:write")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: the token's ``sub`` and its scopes."""

    subject: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    def has(self, scope: str) -> bool:
        return scope in self.scopes or self.is_admin


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id!r} not found")


def check_session_id(session_id: str) -> None:
    if not is_valid_session_id(session_id):
        raise _not_found(session_id)


async def claim_session(store: SessionStore, principal: Principal, session_id: str) -> Session:
    """The caller's session ``session_id``, created for the caller when nobody holds the id yet.

    Another subject's session answers :class:`NotFound`, exactly as a missing one would elsewhere: an id is never
    shared, so whoever uses it first (a stream or a task) owns it, and a stream opened early by another subject
    can never receive the owner's events.
    """
    check_session_id(session_id)
    session = await store.create_session(Session(id=session_id, owner=principal.subject))
    if session.owner != principal.subject:
        raise _not_found(session_id)
    return session


async def claimable_session(store: SessionStore, principal: Principal, session_id: str) -> None:
    """Raise what :func:`claim_session` would for this id (bad id, another subject's session), creating nothing."""
    check_session_id(session_id)
    session = await store.get_session(session_id)
    if session is not None and session.owner != principal.subject:
        raise _not_found(session_id)


async def readable_session(store: SessionStore, principal: Principal, session_id: str) -> Session:
    """The session if the caller owns it or is an admin; :class:`NotFound` otherwise."""
    check_session_id(session_id)
    session = await store.get_session(session_id)
    if session is None or (session.owner != principal.subject and not principal.is_admin):
        raise _not_found(session_id)
    return session


async def owned_session(store: SessionStore, principal: Principal, session_id: str) -> Session:
    """The session if the caller owns it (writes are the owner's alone); :class:`NotFound` otherwise."""
    check_session_id(session_id)
    session = await store.get_session(session_id)
    if session is None or session.owner != principal.subject:
        raise _not_found(session_id)
    return session


async def streamable_session(store: SessionStore, principal: Principal, session_id: str) -> Session:
    """A session the caller may follow: one it may read, or, when the id is free, a new one it then owns.

    Following a session before its first task is the usual order (open the stream, then submit), so a free id is
    claimed here just as a task would claim it.
    """
    check_session_id(session_id)
    session = await store.get_session(session_id)
    if session is None:
        return await claim_session(store, principal, session_id)
    if session.owner != principal.subject and not principal.is_admin:
        raise _not_found(session_id)
    return session
