"""The task board on Redis: one queue for every replica, the session and owner rules, cancels, leases.

- **Queue.** ``alex:queue`` is a stream read through the consumer group ``workers``; each replica is a consumer
  (its replica id) and takes only as many entries as it has free places (``ALEX_WORKER_CONCURRENCY``). Taking a
  task (a Lua script) moves it from ``queued`` to ``running``, gives the replica its lease and acknowledges the
  entry, all at once. An entry a replica received but never started (it died in between) is claimed by another
  replica once it has been idle for a lease.
- **Rules.** ``alex:session:{id}:active`` names the session's queued or running task (one at a time);
  ``alex:owner:{subject}:active`` holds the owner's unfinished tasks (a cap shared by every replica). A reservation
  not followed by its enqueue within :data:`RESERVATION_SECONDS` lapses by itself.
- **Leases.** ``alex:task:{id}:lease`` (the holder's replica id) expires after ``ALEX_TASK_LEASE_SECONDS`` unless
  its holder renews it, every third of that. Every replica looks, once a second at most, for running tasks whose
  lease has been gone for half a lease and marks them ``interrupted`` (one replica wins each, atomically); the
  runner appends the ``error`` event. So a task whose replica died is settled within about 1.5 leases plus a
  second. A lease that lapsed while Redis was away is taken back by its live holder at its next renewal, before
  anyone settles the task; a holder that finds its task settled stops it and stores nothing more.
- **Cancels.** A cancel request is a key (``alex:task:{id}:cancel``) and a message on the control channel: the
  holder acts on the message at once, or on the key at its next renewal if the message was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from service.adapters.jsoncodec import dumps_text
from service.adapters.redis.client import UNREACHABLE, ControlBus, Keys, reachable, stop
from service.adapters.store.sqlite import to_db_time
from service.domain.errors import Conflict, LimitExceeded, Unavailable
from service.domain.events import utc_now
from service.domain.models import Task, TaskStatus

log = structlog.get_logger("service.redis.tasks")

GROUP = "workers"
RESERVATION_SECONDS = 30.0
CANCEL_KEY_SECONDS = 24 * 3600
REAP_EVERY_SECONDS = 1.0
TAKE_BLOCK_MS = 1000
"""How long one read of the queue waits: a draining replica stops taking within this (a blocking read is
never cancelled: redis-py would then wait for the socket's timeout)."""

_RESERVE = """
-- KEYS: session active, owner active; ARGV: task id, cap, now ms, reservation ms
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
local owned = redis.call('ZCARD', KEYS[2])
if owned >= tonumber(ARGV[2]) then return {1, tostring(owned)} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
return {2, ''}
"""

_ENQUEUE = """
-- KEYS: session active, owner active, queue; ARGV: task id
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end  -- the reservation lapsed
redis.call('PERSIST', KEYS[1])
redis.call('ZADD', KEYS[2], '+inf', ARGV[1])
return redis.call('XADD', KEYS[3], '*', 'task', ARGV[1])
"""

_START = """
-- KEYS: task, lease, running, queue; ARGV: task id, replica, lease ms, group, entry id
redis.call('XACK', KEYS[4], ARGV[4], ARGV[5])
if redis.call('HGET', KEYS[1], 'status') ~= '"queued"' then return 0 end
redis.call('HSET', KEYS[1], 'status', '"running"')
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

_WITHDRAW = """
-- KEYS: task
if redis.call('HGET', KEYS[1], 'status') ~= '"queued"' then return 0 end
redis.call('HSET', KEYS[1], 'status', '"cancelled"')
return 1
"""

_RELEASE = """
-- KEYS: session active, owner active, lease, running; ARGV: task id
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
return 0
"""

_RENEW = """
-- KEYS: lease, cancel, task; ARGV: replica, lease ms
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not holder and redis.call('HGET', KEYS[3], 'status') == '"running"' then
    -- Lapsed while Redis was away (it keeps expiry times across a restart), and nobody settled the task yet.
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
    return {0, ''}
end
return {1, redis.call('GET', KEYS[2]) or ''}
"""

_REAP = """
-- KEYS: running, unfinished, task, lease; ARGV: task id, status, error, finished at (JSON), key prefix
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('HGET', KEYS[3], 'status') ~= '"running"' then return 0 end
redis.call('HSET', KEYS[3], 'status', ARGV[2], 'error', ARGV[3], 'finished_at', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
local session = cjson.decode(redis.call('HGET', KEYS[3], 'session_id'))
local owner = cjson.decode(redis.call('HGET', KEYS[3], 'owner'))
local active = ARGV[5] .. ':session:' .. session .. ':active'
if redis.call('GET', active) == ARGV[1] then redis.call('DEL', active) end
redis.call('ZREM', ARGV[5] .. ':owner:' .. owner .. ':active', ARGV[1])
return 1
"""


class RedisTaskBoard:
    """``TaskBoard`` shared by every replica through Redis (see the module docstring)."""

    exclusive = False

    def __init__(self, redis: Redis, blocking: Redis, bus: ControlBus, replica: str, *, lease_seconds: float,
                 interrupted_reason: str, keys: Keys | None = None) -> None:
        # Any: redis-py types its replies as bytes | str whatever decode_responses says; ours are str.
        self._redis: Any = redis
        self._blocking: Any = blocking
        self._bus = bus
        self._replica = replica
        self._lease_ms = int(lease_seconds * 1000)
        self._interrupted_reason = interrupted_reason
        self._keys = keys or Keys()
        self._reserve = redis.register_script(_RESERVE)
        self._enqueue = redis.register_script(_ENQUEUE)
        self._start = redis.register_script(_START)
        self._withdraw = redis.register_script(_WITHDRAW)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)
        self._reap = redis.register_script(_REAP)
        self._held: set[str] = set()
        self._suspects: dict[str, float] = {}
        """Running tasks of other replicas seen without a lease, and since when (monotonic)."""
        self._renew_every = lease_seconds / 3
        self._taking = True
        self._jobs: list[asyncio.Task[None]] = []
        self._on_cancel: Callable[[str, str], None] = lambda task_id, reason: None
        self._on_lost: Callable[[str], None] = lambda task_id: None
        self._on_reaped: Callable[[str], Awaitable[None]] | None = None
        bus.on("cancel", self._cancel_message)

    def bind(self, on_cancel: Callable[[str, str], None], on_lost: Callable[[str], None],
             on_reaped: Callable[[str], Awaitable[None]]) -> None:
        self._on_cancel, self._on_lost, self._on_reaped = on_cancel, on_lost, on_reaped

    async def start(self) -> None:
        with contextlib.suppress(*UNREACHABLE):
            await self._create_group()
        self._jobs = [asyncio.create_task(self._renewing(), name="task lease renewal"),
                      asyncio.create_task(self._reaping(), name="task lease check")]

    async def _create_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._keys.queue, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- submitting ---------------------------------------------------------------------------------------------

    async def reserve(self, task: Task, max_per_owner: int) -> None:
        k = self._keys
        with reachable("reserve the session"):
            outcome, detail = await self._reserve(
                keys=[k.session_active(task.session_id), k.owner_active(task.owner)],
                args=[task.id, max_per_owner, int(time.time() * 1000), int(RESERVATION_SECONDS * 1000)])
        if int(outcome) == 0:
            raise Conflict(f"session {task.session_id!r} is running task {detail}; wait for it or cancel it")
        if int(outcome) == 1:
            raise LimitExceeded(f"{detail} tasks are running for this client (ALEX_MAX_TASKS_PER_CLIENT)")

    async def enqueue(self, task: Task) -> None:
        k = self._keys
        with reachable("queue the task"):
            queued = await self._enqueue(keys=[k.session_active(task.session_id), k.owner_active(task.owner),
                                               k.queue], args=[task.id])
        if queued is None:
            raise Unavailable(f"task {task.id} waited too long to be queued (its reservation lapsed); submit again")

    # --- taking -------------------------------------------------------------------------------------------------

    async def take(self, limit: int) -> list[str]:
        if not self._taking:
            return []
        with reachable("take from the queue"):
            try:
                entries = await self._claim_stale(limit)
                if not entries:
                    reply: Any = await self._blocking.xreadgroup(
                        GROUP, self._replica, {self._keys.queue: ">"}, count=limit, block=TAKE_BLOCK_MS)
                    entries = [entry for _, stream_entries in reply or () for entry in stream_entries]
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._create_group()  # Redis lost its data (restarted without persistence)
                return []
            if not self._taking:
                await self._hand_back(entries)
                return []
            return [task_id for task_id in [await self._begin(entry) for entry in entries] if task_id]

    async def _claim_stale(self, limit: int) -> list[tuple[str, dict[str, str]]]:
        """Entries another replica received but never started (it stopped in between), idle for a lease."""
        reply: Any = await self._redis.xautoclaim(self._keys.queue, GROUP, self._replica,
                                                  min_idle_time=self._lease_ms, start_id="0-0", count=limit)
        return [entry for entry in reply[1] if entry and entry[1]]

    async def _begin(self, entry: tuple[str, dict[str, str]]) -> str | None:
        entry_id, fields = entry
        task_id = fields.get("task", "")
        k = self._keys
        started = await self._start(keys=[k.task(task_id), k.lease(task_id), k.running, k.queue],
                                    args=[task_id, self._replica, self._lease_ms, GROUP, entry_id])
        if not int(started):
            return None  # withdrawn (cancelled while queued) or its session was deleted
        self._held.add(task_id)
        return task_id

    async def _hand_back(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Draining: put entries received just now back at the end of the queue for the other replicas."""
        for entry_id, fields in entries:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self._keys.queue, fields)
                pipe.xack(self._keys.queue, GROUP, entry_id)
                await pipe.execute()

    def stop_taking(self) -> None:
        self._taking = False

    async def withdraw_all(self) -> list[str]:
        """Queued tasks stay in the shared queue for the other replicas."""
        return []

    # --- settling and cancelling --------------------------------------------------------------------------------

    async def withdraw(self, task_id: str) -> bool:
        with reachable("withdraw the task"):
            return bool(int(await self._withdraw(keys=[self._keys.task(task_id)])))

    async def request_cancel(self, task_id: str, reason: str) -> None:
        if task_id in self._held:
            self._on_cancel(task_id, reason)
            return
        with reachable("cancel the task"):
            await self._redis.set(self._keys.cancel(task_id), reason, ex=CANCEL_KEY_SECONDS)
        await self._bus.publish("cancel", task_id=task_id, reason=reason)

    def _cancel_message(self, message: dict[str, Any]) -> None:
        task_id = str(message.get("task_id"))
        if task_id in self._held:
            self._on_cancel(task_id, str(message.get("reason") or "cancelled"))

    async def release(self, task: Task) -> None:
        k = self._keys
        with reachable("release the task"):
            await self._release(keys=[k.session_active(task.session_id), k.owner_active(task.owner),
                                      k.lease(task.id), k.running], args=[task.id])
        self._held.discard(task.id)

    async def session_task(self, session_id: str) -> str | None:
        with reachable("read the session's task"):
            holder: str | None = await self._redis.get(self._keys.session_active(session_id))
        return holder

    # --- leases -------------------------------------------------------------------------------------------------

    async def _renewing(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every)
            for task_id in list(self._held):
                try:
                    held, cancel = await self._renew(
                        keys=[self._keys.lease(task_id), self._keys.cancel(task_id), self._keys.task(task_id)],
                        args=[self._replica, self._lease_ms])
                except UNREACHABLE:
                    break  # Redis is away: try again next time (the lease outlives a short outage)
                except Exception:
                    log.exception("lease_renewal_failed", task_id=task_id)
                    continue
                if not int(held):
                    if task_id in self._held:
                        self._held.discard(task_id)
                        self._on_lost(task_id)
                elif cancel:
                    self._on_cancel(task_id, cancel)

    async def _reaping(self) -> None:
        every = min(REAP_EVERY_SECONDS, self._renew_every)
        while True:
            await asyncio.sleep(every)
            try:
                await self._reap_once()
            except UNREACHABLE:
                continue
            except Exception:
                log.exception("lease_check_failed")

    async def _reap_once(self) -> None:
        """Settle the running tasks whose lease has been gone for more than a renewal period.

        Seen gone once is not enough: after an outage longer than a lease every lease is gone at once, and the
        live holders take theirs back at their next renewal; only a holder that is really gone misses it.
        """
        k = self._keys
        running: set[str] = await self._redis.smembers(k.running)
        candidates = sorted(running - self._held)
        if not candidates:
            self._suspects.clear()
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for task_id in candidates:
                pipe.exists(k.lease(task_id))
            leased = await pipe.execute()
        now = time.monotonic()
        missing = {task_id for task_id, exists in zip(candidates, leased, strict=True) if not exists}
        self._suspects = {task_id: self._suspects.get(task_id, now) for task_id in missing}
        for task_id, since in list(self._suspects.items()):
            if now - since < self._renew_every * 1.5:
                continue
            del self._suspects[task_id]
            reaped = await self._reap(
                keys=[k.running, k.unfinished, k.task(task_id), k.lease(task_id)],
                args=[task_id, dumps_text(TaskStatus.INTERRUPTED.value), dumps_text(self._interrupted_reason),
                      dumps_text(_now_text()), k.prefix])
            if int(reaped) and self._on_reaped is not None:
                try:
                    await self._on_reaped(task_id)
                except Exception:
                    log.exception("interrupted_task_not_reported", task_id=task_id)

    async def close(self) -> None:
        self.stop_taking()
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            await stop(job)


def _now_text() -> str:
    return to_db_time(utc_now())
