"""What the Redis adapters share: the connection, the key names, the error mapping and the control channel.

Every key starts with ``alex:``. The adapters run Lua scripts that touch several keys at once, so they need one
Redis primary (a managed Redis, or Sentinel), not Redis Cluster. docs/operations.md lists every key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from service.domain.errors import Unavailable

log = structlog.get_logger("service.redis")

CONNECT_TIMEOUT_SECONDS = 2.0
COMMAND_TIMEOUT_SECONDS = 5.0
"""No command waits longer for its answer (blocking reads set their own, longer, timeout)."""

CONTROL_CHANNEL = "alex:control"

UNREACHABLE: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
)
"""What Redis raises when it cannot be reached or is starting (the operation may be retried later)."""


BLOCK_SECONDS = 5.0
"""The longest a blocking read waits on the server (its socket waits this plus the command timeout)."""

MAX_CONNECTIONS = 100
"""The shared pool's default size (``ALEX_REDIS_MAX_CONNECTIONS``)."""

POOL_WAIT_SECONDS = COMMAND_TIMEOUT_SECONDS
"""How long a command waits for a free connection of a full pool before it fails (as Redis being unreachable)."""


def connect(url: str, *, blocking: bool = False, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """A client for ``url`` answering text; ``blocking``: one connection of its own for a blocking reader.

    Otherwise the client's commands share a pool of at most ``max_connections``, and a command that finds them all
    busy waits for one (up to :data:`POOL_WAIT_SECONDS`). A burst of reads (a thousand streams replaying at once
    after a deploy) so queues for a moment instead of failing: redis-py's default pool refuses a command outright
    past 100 connections in use (``MaxConnectionsError``), which would end those streams.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        # A pooled connection Redis closed (it restarted) fails its next command: retry that on a new one. A reply
        # lost mid-way may so run a write twice; every write here is idempotent but an event's, which then is
        # stored twice under two ids (never one id twice).
        "retry": Retry(ExponentialBackoff(cap=0.25, base=0.02), retries=2),
        "retry_on_error": [redis_errors.ConnectionError, redis_errors.TimeoutError],
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": COMMAND_TIMEOUT_SECONDS + (BLOCK_SECONDS if blocking else 0.0),
        "health_check_interval": 0 if blocking else 10,
        "client_name": "alex-server",
    }
    if blocking:
        return Redis.from_url(url, single_connection_client=True, **options)
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=POOL_WAIT_SECONDS,
                                           **options)
    return Redis.from_pool(pool)


REFUSING = ("OOM", "READONLY", "MASTERDOWN", "LOADING", "NOREPLICAS", "MISCONF")
"""Replies of a Redis that is up but refuses writes for now (full, a replica, failing over, loading, disk)."""


@contextlib.contextmanager
def reachable(what: str) -> Any:
    """Turn "Redis cannot be reached" or "refuses writes for now" into :class:`Unavailable` (503); other Redis
    errors are bugs and propagate."""
    try:
        yield
    except UNREACHABLE as exc:
        raise Unavailable(f"{what}: Redis is unavailable ({type(exc).__name__}); retry shortly") from exc
    except redis_errors.ResponseError as exc:
        if not str(exc).startswith(REFUSING):
            raise
        raise Unavailable(f"{what}: Redis refuses it for now ({str(exc).split(maxsplit=1)[0]}); retry shortly") from exc


class Keys:
    """The names of every key, in one place."""

    def __init__(self, prefix: str = "alex") -> None:
        self.prefix = prefix

    # Sessions and tasks
    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def session_tasks(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}:tasks"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    def owner_sessions(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:sessions"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    @property
    def unfinished(self) -> str:
        return f"{self.prefix}:tasks:unfinished"

    # Events
    def events(self, session_id: str) -> str:
        return f"{self.prefix}:events:{session_id}"

    @property
    def event_ids(self) -> str:
        return f"{self.prefix}:events:next_id"

    def wake(self, replica: str) -> str:
        return f"{self.prefix}:replica:{replica}:wake"

    # The task queue and who runs what
    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    def session_active(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}:active"

    def owner_active(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:active"

    def lease(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}:lease"

    def cancel(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}:cancel"

    @property
    def running(self) -> str:
        return f"{self.prefix}:tasks:running"

    # Limits
    def owner_streams(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:streams"


Handler = Callable[[dict[str, Any]], None]

STOP_WAIT_SECONDS = 1.0


async def stop(job: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop and wait for it to end, cancelling again if a cancel was lost.

    On Python 3.11 a cancel that lands while redis-py sends a command can be swallowed by the ``asyncio.wait_for``
    it sends through (CPython issue #86296, fixed in 3.12): the loop then goes on, and a plain ``await`` after one
    ``cancel`` would wait for ever, hanging the server's shutdown.
    """
    if job is None:
        return
    while not job.done():
        job.cancel()
        await asyncio.wait([job], timeout=STOP_WAIT_SECONDS)
    if not job.cancelled() and job.exception() is not None:
        log.warning("background_loop_failed", loop=job.get_name(), error=repr(job.exception()))


class ControlBus:
    """One pub/sub connection per replica for the messages replicas send each other (cancel a task, a session was
    deleted). A message is lost if a replica's connection drops; the handlers registered with ``on_reconnect``
    make up for it (the stores are the truth: a lost cancel is found by the lease check, lost streams are closed).
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._handlers: dict[str, list[Handler]] = {}
        self._on_lost: list[Callable[[], None]] = []
        self._job: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def on(self, kind: str, handler: Handler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def on_lost(self, handler: Callable[[], None]) -> None:
        """Called when the connection drops: messages may be missed until it is back."""
        self._on_lost.append(handler)

    async def publish(self, kind: str, **fields: Any) -> None:
        with reachable(kind):
            await self._redis.publish(CONTROL_CHANNEL, json.dumps({"kind": kind, **fields}))

    def start(self) -> None:
        self._job = asyncio.create_task(self._listen(), name="redis control channel")

    async def close(self) -> None:
        job, self._job = self._job, None
        await stop(job)

    async def _listen(self) -> None:
        lost = False
        delay = 0.1
        while True:
            try:
                async with self._subscribed() as pubsub:
                    self.connected.set()
                    delay = 0.1
                    if lost:
                        lost = False
                        log.info("redis_control_back")
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                        if message is not None:
                            self._dispatch(message.get("data"))
            except asyncio.CancelledError:
                raise
            except UNREACHABLE as exc:
                self.connected.clear()
                if not lost:
                    lost = True
                    log.warning("redis_control_lost", error=type(exc).__name__)
                    for handler in self._on_lost:
                        handler()
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    @contextlib.asynccontextmanager
    async def _subscribed(self) -> AsyncIterator[Any]:
        pubsub: Any = self._redis.pubsub()
        try:
            await pubsub.subscribe(CONTROL_CHANNEL)
            yield pubsub
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _dispatch(self, data: Any) -> None:
        try:
            message = json.loads(data)
            kind = message.pop("kind")
        except (TypeError, ValueError, KeyError, AttributeError):
            log.warning("redis_control_message_ignored")
            return
        for handler in self._handlers.get(kind, ()):
            try:
                handler(message)
            except Exception:
                log.exception("redis_control_handler_failed", kind=kind)
