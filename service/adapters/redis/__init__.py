"""The Redis adapters, for several replicas: sessions and tasks, the event log, the task board, the stream cap.

:func:`open_redis` opens them all on one Redis (the composition root calls it when ``ALEX_REDIS_URL`` is set).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service.adapters.redis.client import ControlBus, Keys, connect
from service.adapters.redis.events import RedisEventLog
from service.adapters.redis.limits import RedisClientStreams
from service.adapters.redis.sessions import RedisSessionStore
from service.adapters.redis.tasks import RedisTaskBoard
from service.config import Settings


def replica_name(settings: Settings) -> str:
    """``ALEX_REPLICA_ID``, or the host name (the pod's name on Kubernetes) and the process id."""
    return settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class RedisBackend:
    replica: str
    store: RedisSessionStore
    events: RedisEventLog
    board: RedisTaskBoard
    client_streams: RedisClientStreams
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """In the order they must run."""


async def open_redis(settings: Settings, *, interrupted_reason: str) -> RedisBackend:
    """Connect (lazily: a Redis that is down at start makes the server unready, not dead) and wire the adapters."""
    assert settings.redis_url is not None
    replica = replica_name(settings)
    keys = Keys()
    redis = connect(settings.redis_url, max_connections=settings.redis_max_connections)
    event_reader = connect(settings.redis_url, blocking=True)
    queue_reader = connect(settings.redis_url, blocking=True)
    bus = ControlBus(redis)
    store = RedisSessionStore(redis, keys)
    events = RedisEventLog(redis, event_reader, bus, replica, retention=settings.event_retention,
                           ttl_seconds=settings.redis_event_ttl_seconds,
                           backlog_limit=settings.redis_outage_buffer_events, keys=keys)
    board = RedisTaskBoard(redis, queue_reader, bus, replica, lease_seconds=settings.task_lease_seconds,
                           interrupted_reason=interrupted_reason, keys=keys)
    client_streams = RedisClientStreams(redis, keys)
    bus.start()
    events.start()
    client_streams.start()
    closers: list[Callable[[], Awaitable[None]]] = [
        client_streams.close, events.close, bus.close, board.close,
        queue_reader.aclose, event_reader.aclose, redis.aclose,
    ]
    return RedisBackend(replica, store, events, board, client_streams, closers)
