"""The per-client stream cap shared by every replica: ``alex:owner:{subject}:streams``, one entry per open stream.

Each entry is scored with the time it lapses; its replica pushes that forward every third of
:data:`STREAM_ENTRY_SECONDS` while the stream is open, so the streams of a replica that died stop counting
within that time. (The request-rate limits are slowapi's, in the same Redis: service/api/ratelimit.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from redis.asyncio import Redis

from service.adapters.redis.client import UNREACHABLE, Keys, reachable, stop
from service.domain.errors import LimitExceeded

log = structlog.get_logger("service.redis.limits")

STREAM_ENTRY_SECONDS = 60.0

_ACQUIRE = """
-- KEYS: the subject's streams; ARGV: stream id, limit, now ms, lapses at ms
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[2]) then return open end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return -1
"""


class RedisClientStreams:
    """``ClientStreams`` in Redis (see the module docstring)."""

    def __init__(self, redis: Redis, keys: Keys | None = None) -> None:
        # Any: redis-py types its replies as bytes | str whatever decode_responses says; ours are str.
        self._redis: Any = redis
        self._keys = keys or Keys()
        self._acquire = redis.register_script(_ACQUIRE)
        self._open: dict[str, str] = {}
        """Stream id -> subject, for the refresh."""
        self._jobs: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._refresher = asyncio.create_task(self._refreshing(), name="stream cap refresh")

    async def acquire(self, subject: str, stream_id: str, limit: int) -> None:
        now = int(time.time() * 1000)
        with reachable("count the client's streams"):
            open_count = int(await self._acquire(keys=[self._keys.owner_streams(subject)],
                                                 args=[stream_id, limit, now, now + int(STREAM_ENTRY_SECONDS * 1000)]))
        if open_count >= 0:
            raise LimitExceeded(f"{open_count} streams are open for this client (ALEX_MAX_STREAMS_PER_CLIENT)",
                                retry_after=5)
        self._open[stream_id] = subject

    def release(self, subject: str, stream_id: str) -> None:
        if self._open.pop(stream_id, None) is None:
            return
        job = asyncio.create_task(self._remove(subject, stream_id), name="stream cap release")
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _remove(self, subject: str, stream_id: str) -> None:
        with contextlib.suppress(*UNREACHABLE):  # it lapses by itself
            await self._redis.zrem(self._keys.owner_streams(subject), stream_id)

    async def _refreshing(self) -> None:
        while True:
            await asyncio.sleep(STREAM_ENTRY_SECONDS / 3)
            if not self._open:
                continue
            lapses = int((time.time() + STREAM_ENTRY_SECONDS) * 1000)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for stream_id, subject in list(self._open.items()):
                        key = self._keys.owner_streams(subject)
                        pipe.zadd(key, {stream_id: lapses}, xx=True)
                        pipe.pexpireat(key, lapses)
                    await pipe.execute()
            except UNREACHABLE:
                continue
            except Exception:
                log.exception("stream_cap_refresh_failed")

    async def close(self) -> None:
        refresher, self._refresher = self._refresher, None
        await stop(refresher)
        for job in list(self._jobs):
            with contextlib.suppress(Exception):
                await job
