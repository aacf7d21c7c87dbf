"""Sessions and tasks in Redis hashes, shared by every replica.

A session is the hash ``alex:session:{id}``, a task ``alex:task:{id}``; every field holds the JSON of its value
(``null`` for none), so a Lua script can set one field without knowing the others. Writes that must not
interleave (create a session or a task, delete a session with its tasks) are Lua scripts, atomic in Redis.
Sessions and tasks are listed in creation order through sorted sets scored by their creation time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from service.adapters.jsoncodec import dumps_text
from service.adapters.redis.client import Keys, reachable
from service.adapters.store.sqlite import from_db_time, to_db_time
from service.domain.events import utc_now
from service.domain.models import Session, Task, TaskStatus, Todo

_CREATE_SESSION = """
-- KEYS: session, sessions, owner's sessions; ARGV: id, created at (microseconds), then field/value pairs
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], unpack(ARGV, 3))
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
    redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

_UPDATE_SESSION = """
-- KEYS: session; ARGV: field, value, updated_at
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'updated_at', ARGV[3])
end
return 0
"""

_DELETE_SESSION = """
-- KEYS: session, sessions, session's tasks, unfinished; ARGV: id, owner's sessions key prefix, task key prefix
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then
    redis.call('ZREM', KEYS[2], ARGV[1])
    redis.call('ZREM', ARGV[2] .. cjson.decode(owner) .. ':sessions', ARGV[1])
end
for _, task_id in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    redis.call('DEL', ARGV[3] .. task_id)
    redis.call('ZREM', KEYS[4], task_id)
end
redis.call('DEL', KEYS[1], KEYS[3])
return 0
"""

_CREATE_TASK = """
-- KEYS: task, session's tasks, unfinished; ARGV: id, unfinished (1/0), created at (microseconds), field/value pairs
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[2] == '1' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1]) end
return 1
"""

_UPDATE_TASK = """
-- KEYS: task, unfinished; ARGV: id, unfinished (1/0), created at (microseconds), then field/value pairs
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] == '1' then redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[1]) else redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""

_INTERRUPT_UNFINISHED = """
-- KEYS: unfinished; ARGV: task key prefix, status, error, finished_at (JSON each)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, task_id in ipairs(ids) do
    redis.call('HSET', ARGV[1] .. task_id, 'status', ARGV[2], 'error', ARGV[3], 'finished_at', ARGV[4])
end
redis.call('DEL', KEYS[1])
return ids
"""

_UNFINISHED = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else to_db_time(moment)


def session_fields(session: Session) -> dict[str, str]:
    return {
        "owner": dumps_text(session.owner),
        "created_at": dumps_text(to_db_time(session.created_at)),
        "updated_at": dumps_text(to_db_time(session.updated_at)),
        "messages": dumps_text(session.messages),
        "todos": dumps_text([todo.to_dict() for todo in session.todos]),
    }


def session_from_fields(session_id: str, fields: dict[str, str]) -> Session:
    return Session(
        id=session_id,
        owner=json.loads(fields["owner"]),
        created_at=from_db_time(json.loads(fields["created_at"])),
        updated_at=from_db_time(json.loads(fields["updated_at"])),
        messages=json.loads(fields["messages"]),
        todos=[Todo.from_dict(todo) for todo in json.loads(fields["todos"])],
    )


def task_fields(task: Task) -> dict[str, str]:
    values: dict[str, Any] = {
        "id": task.id,
        "session_id": task.session_id,
        "owner": task.owner,
        "text": task.text,
        "status": TaskStatus(task.status).value,
        "created_at": _time(task.created_at),
        "started_at": _time(task.started_at),
        "finished_at": _time(task.finished_at),
        "final_answer": task.final_answer,
        "iterations": task.iterations,
        "usage": task.usage,
        "error": task.error,
        "trace_id": task.trace_id,
    }
    return {name: dumps_text(value) for name, value in values.items()}


def task_from_fields(fields: dict[str, str]) -> Task:
    values = {name: json.loads(value) for name, value in fields.items()}

    def moment(name: str) -> datetime | None:
        text = values.get(name)
        return None if text is None else from_db_time(text)

    created = moment("created_at")
    return Task(
        id=values["id"],
        session_id=values["session_id"],
        owner=values["owner"],
        text=values["text"],
        status=TaskStatus(values["status"]),
        created_at=created if created is not None else utc_now(),
        started_at=moment("started_at"),
        finished_at=moment("finished_at"),
        final_answer=values.get("final_answer"),
        iterations=int(values.get("iterations") or 0),
        usage={str(key): int(value) for key, value in (values.get("usage") or {}).items()},
        error=values.get("error"),
        trace_id=values.get("trace_id") or "",
    )


def _score(moment: datetime) -> int:
    """Microseconds since the epoch: exact in a sorted set's score (a double) for the next 250 years."""
    return round(from_db_time(to_db_time(moment)).timestamp() * 1_000_000)


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


class RedisSessionStore:
    """``SessionStore`` on Redis (see the module docstring); the same rules as the SQLite store.

    A Redis that cannot be reached raises :class:`~service.domain.errors.Unavailable` (the API answers 503).
    """

    def __init__(self, redis: Redis, keys: Keys | None = None) -> None:
        # Any: redis-py types its replies as bytes | str whatever decode_responses says; ours are str.
        self._redis: Any = redis
        self._keys = keys or Keys()
        self._create_session = redis.register_script(_CREATE_SESSION)
        self._update_session = redis.register_script(_UPDATE_SESSION)
        self._delete_session = redis.register_script(_DELETE_SESSION)
        self._create_task = redis.register_script(_CREATE_TASK)
        self._update_task = redis.register_script(_UPDATE_TASK)
        self._interrupt = redis.register_script(_INTERRUPT_UNFINISHED)

    async def create_session(self, session: Session) -> Session:
        k = self._keys
        with reachable("create the session"):
            raw = await self._create_session(
                keys=[k.session(session.id), k.sessions, k.owner_sessions(session.owner)],
                args=[session.id, _score(session.created_at), *_flatten(session_fields(session))])
        return session_from_fields(session.id, _pairs(raw))

    async def get_session(self, session_id: str) -> Session | None:
        with reachable("read the session"):
            fields = await self._redis.hgetall(self._keys.session(session_id))
        return session_from_fields(session_id, fields) if fields else None

    async def list_sessions(self, owner: str | None) -> list[str]:
        key = self._keys.sessions if owner is None else self._keys.owner_sessions(owner)
        with reachable("list the sessions"):
            ids: list[str] = await self._redis.zrange(key, 0, -1)
        return ids

    async def save_messages(self, session_id: str, messages: Sequence[dict[str, Any]]) -> None:
        await self._set_session_field(session_id, "messages", dumps_text(list(messages)))

    async def get_todos(self, session_id: str) -> list[Todo]:
        with reachable("read the todos"):
            raw = await self._redis.hget(self._keys.session(session_id), "todos")
        return [] if raw is None else [Todo.from_dict(todo) for todo in json.loads(raw)]

    async def set_todos(self, session_id: str, todos: Sequence[Todo]) -> None:
        await self._set_session_field(session_id, "todos", dumps_text([todo.to_dict() for todo in todos]))

    async def _set_session_field(self, session_id: str, field: str, value: str) -> None:
        with reachable(f"save the session's {field}"):
            await self._update_session(keys=[self._keys.session(session_id)],
                                       args=[field, value, dumps_text(to_db_time(utc_now()))])

    async def delete_session(self, session_id: str) -> None:
        k = self._keys
        with reachable("delete the session"):
            await self._delete_session(
                keys=[k.session(session_id), k.sessions, k.session_tasks(session_id), k.unfinished],
                args=[session_id, f"{k.prefix}:owner:", f"{k.prefix}:task:"])

    async def create_task(self, task: Task) -> None:
        k = self._keys
        with reachable("store the task"):
            created = await self._create_task(
                keys=[k.task(task.id), k.session_tasks(task.session_id), k.unfinished],
                args=[task.id, "1" if task.status in _UNFINISHED else "0", _score(task.created_at),
                      *_flatten(task_fields(task))])
        if not created:
            raise ValueError(f"task {task.id} exists already")

    async def get_task(self, task_id: str) -> Task | None:
        with reachable("read the task"):
            fields = await self._redis.hgetall(self._keys.task(task_id))
        return task_from_fields(fields) if fields else None

    async def update_task(self, task: Task) -> None:
        fields = task_fields(task)
        # Where a task belongs never changes.
        for name in ("id", "session_id", "owner"):
            del fields[name]
        with reachable("save the task"):
            await self._update_task(keys=[self._keys.task(task.id), self._keys.unfinished],
                                    args=[task.id, "1" if task.status in _UNFINISHED else "0", _score(task.created_at),
                                          *_flatten(fields)])

    async def find_tasks(self, session_id: str, statuses: Sequence[TaskStatus]) -> list[Task]:
        if not statuses:
            return []
        wanted = {TaskStatus(status) for status in statuses}
        with reachable("find the session's tasks"):
            ids = await self._redis.zrange(self._keys.session_tasks(session_id), 0, -1)
            tasks = await self._tasks(ids)
        return [task for task in tasks if task.status in wanted]

    async def interrupt_unfinished_tasks(self, reason: str) -> list[Task]:
        """Every ``queued`` or ``running`` task of every replica: for a single replica's restart (tests, tools);
        with several replicas the lease check interrupts only the tasks whose replica stopped."""
        with reachable("interrupt the unfinished tasks"):
            ids = await self._interrupt(
                keys=[self._keys.unfinished],
                args=[f"{self._keys.prefix}:task:", dumps_text(TaskStatus.INTERRUPTED.value), dumps_text(reason),
                      dumps_text(to_db_time(utc_now()))])
            return await self._tasks(ids)

    async def _tasks(self, ids: Sequence[str]) -> list[Task]:
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(self._keys.task(task_id))
            rows = await pipe.execute()
        return [task_from_fields(fields) for fields in rows if fields]

    async def ping(self) -> None:
        with reachable("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        """Nothing of its own: the connection pool is closed by whoever opened it."""


def _pairs(raw: Sequence[str]) -> dict[str, str]:
    return dict(zip(raw[::2], raw[1::2], strict=True))
