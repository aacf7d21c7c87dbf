"""Errors the use cases raise. They know nothing of HTTP: ``service.api.problems`` maps them to statuses."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a caller can act on; the message is safe to show to the client."""


class NotFound(DomainError):
    """The thing does not exist, or belongs to someone else (the two are never told apart)."""


class Invalid(DomainError):
    """The request is well-formed but its content is not acceptable (an empty task, a task over the size cap)."""


class Conflict(DomainError):
    """The request is valid but the thing's state does not allow it now (a second task, a finished task)."""


class Unavailable(DomainError):
    """The service cannot take this now (draining, a backend down); the client may retry elsewhere or later."""


class LimitExceeded(DomainError):
    """A per-client cap (open streams, running tasks) is reached."""

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
