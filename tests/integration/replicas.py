"""Several real server processes (replicas) on one real redis-server, and the calls the scale-out tests share.

A :class:`Cluster` names its replicas (``a``, ``b``, ``c``: ``ALEX_REPLICA_ID``); each has a data folder of its own
(workspaces are per replica) and the harness's one ``SECRET``, so a token is valid on every replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from service.client import SseMessage
from tests.integration.calls import STREAM_TIMEOUT, TERMINAL
from tests.integration.server import ServerProcess, auth, data_folder
from tests.redis_server import RedisServer

LEASE_SECONDS = 2.0
"""``ALEX_TASK_LEASE_SECONDS`` for every replica: short, so that a dead replica's task is noticed quickly."""

# Log events worth showing when a test fails (the access log would bury them).
_QUIET_EVENTS = frozenset({"http_request"})


class Cluster:
    """Replicas sharing ``redis``; :meth:`add` makes one (started or not), :meth:`start` starts several at once."""

    def __init__(self, redis: RedisServer, stack: contextlib.ExitStack, env: dict[str, str]) -> None:
        self.redis = redis
        self.replicas: dict[str, ServerProcess] = {}
        self._stack = stack
        self._env = env
        self._log_marks: dict[str, int] = {}

    def __getitem__(self, name: str) -> ServerProcess:
        return self.replicas[name]

    def add(self, name: str, **env: str) -> ServerProcess:
        """A replica named ``name`` (not started), with ``env`` on top of the cluster's."""
        folder = self._stack.enter_context(data_folder())
        process = ServerProcess(folder, env={
            "ALEX_REDIS_URL": self.redis.url,
            "ALEX_REPLICA_ID": name,
            "ALEX_TASK_LEASE_SECONDS": str(LEASE_SECONDS),
            **self._env,
            **env,
        })
        self._stack.callback(process.kill)
        self.replicas[name] = process
        return process

    def start(self, *names: str) -> None:
        """Start the named replicas in parallel (each start waits for ``/ready``)."""
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            for future in [pool.submit(self.replicas[name].start) for name in names]:
                future.result()

    def client(self, name: str, subject: str = "alice") -> httpx.AsyncClient:
        """A client of replica ``name`` with ``subject``'s token."""
        return httpx.AsyncClient(base_url=self.replicas[name].base_url, headers=auth(subject), timeout=10.0)

    def runners_of(self, task_id: str) -> list[str]:
        """The replicas that logged ``task_started`` for the task (one, once it runs; never two)."""
        return [name for name, process in self.replicas.items()
                if any(r.get("task_id") == task_id for r in process.events_logged("task_started"))]

    async def wait_runner(self, task_id: str, seconds: float = 5.0) -> str:
        """The replica that runs the task, once one has logged ``task_started``; checks that it names itself."""
        await wait_for(lambda: self.runners_of(task_id), seconds, f"a replica starts task {task_id}")
        runners = self.runners_of(task_id)
        assert len(runners) == 1, f"task {task_id} started on {runners}"
        record = next(r for r in self.replicas[runners[0]].events_logged("task_started") if r["task_id"] == task_id)
        assert record["replica"] == runners[0], record
        return runners[0]

    def logged(self, name: str, event: str, **fields: Any) -> list[dict[str, Any]]:
        """Replica ``name``'s log lines ``event`` whose fields include ``fields``."""
        return [r for r in self.replicas[name].events_logged(event)
                if all(r.get(k) == v for k, v in fields.items())]

    def mark_logs(self) -> None:
        """Remember where each replica's log is, for :meth:`print_logs_since_mark`."""
        self._log_marks = {name: len(p.raw_logs) for name, p in self.replicas.items()}

    def print_logs_since_mark(self, limit: int = 150) -> None:
        """Print (for pytest's captured output of a failed test) each replica's log lines since :meth:`mark_logs`,
        without the access log."""
        for name, process in self.replicas.items():
            lines = [line for line in process.raw_logs[self._log_marks.get(name, 0):]
                     if not any(f'"event": "{quiet}"' in line for quiet in _QUIET_EVENTS)]
            print(f"----- replica {name} ({len(lines)} lines, last {limit}) -----")
            print("\n".join(lines[-limit:]))
        print(f"----- redis ({'running' if self.redis.running else 'stopped'}) -----")
        print(self.redis.log_tail())


@contextlib.contextmanager
def cluster(redis: RedisServer, names: tuple[str, ...], *, start: bool = True, **env: str) -> Iterator[Cluster]:
    """Replicas ``names`` on ``redis`` with ``env`` (started in parallel unless ``start`` is false), killed after;
    their logs since the start are printed on the way out (pytest shows them when the test failed)."""
    with contextlib.ExitStack() as stack:
        replicas = Cluster(redis, stack, dict(env))
        stack.callback(replicas.print_logs_since_mark)
        for name in names:
            replicas.add(name)
        if start:
            replicas.start(*names)
        yield replicas


def subject(name: str) -> str:
    """A subject of its own for each test, so that no test spends another's quota or sees its sessions."""
    return f"{name}-{secrets.token_hex(4)}"


def session_name(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def loop_command(steps: int, pause: float, marker: str) -> str:
    """A command that prints ``step-N-<marker>`` ``steps`` times, ``pause`` seconds apart: a task whose events
    (one ``tool_call_stream`` a line) are spread over time, and whose process :func:`processes_matching` finds."""
    return f"for i in $(seq 1 {steps}); do echo step-$i-{marker}; sleep {pause}; done"


async def wait_for(predicate: Callable[[], object], seconds: float, what: str) -> float:
    """Poll ``predicate`` until it is true; returns when (monotonic). Fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic()


async def wait_for_async(predicate: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    """:func:`wait_for` for a predicate that makes requests."""
    deadline = time.monotonic() + seconds
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic()


def event_of(message: SseMessage) -> dict[str, Any]:
    """The event a message carries, checked against its frame (``event:`` and ``id:`` lines)."""
    body: dict[str, Any] = message.json()
    assert (message.event, message.id) == (body["event_type"], body["id"]), message
    return body


async def take(messages: AsyncGenerator[SseMessage, None], *, count: int | None = None,
               until: str | frozenset[str] | None = None, task_id: str | None = None) -> list[dict[str, Any]]:
    """``count`` events, or the events up to the first of type ``until`` (of ``task_id`` when given). Fails when
    the stream ends first or takes longer than ``STREAM_TIMEOUT``."""
    kinds = frozenset({until}) if isinstance(until, str) else until
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages:
            event = event_of(message)
            events.append(event)
            if count is not None and len(events) == count:
                return events
            if kinds is not None and event["event_type"] in kinds and task_id in (None, event["task_id"]):
                return events
    raise AssertionError(f"the stream ended before {count or sorted(kinds or ())}: "
                         f"{[(e['id'], e['event_type']) for e in events]}")


async def take_until_terminal(messages: AsyncGenerator[SseMessage, None], task_id: str) -> list[dict[str, Any]]:
    return await take(messages, until=TERMINAL, task_id=task_id)


async def read_to_end(messages: AsyncGenerator[SseMessage, None], seconds: float) -> list[dict[str, Any]]:
    """Every event until the server ends the stream (the response finishes); fails if it does not within
    ``seconds`` or if the connection breaks instead of ending."""
    events: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(seconds):
            async for message in messages:
                events.append(event_of(message))
    except TimeoutError:
        raise AssertionError(f"the stream was still open after {seconds}s "
                             f"(received {[(e['id'], e['event_type']) for e in events]})") from None
    except httpx.HTTPError as exc:
        raise AssertionError(f"the stream broke instead of ending: {exc!r}") from exc
    return events


def check_ids(events: list[dict[str, Any]]) -> list[int]:
    """The events' ids, checked strictly increasing (so no duplicate either); returns them."""
    ids = [int(e["id"]) for e in events]
    assert all(b > a for a, b in itertools.pairwise(ids)), f"ids not strictly increasing: {ids}"
    return ids




async def task_status(client: httpx.AsyncClient, task_id: str) -> str:
    response = await client.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


def check_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= set(body), body
    assert body["status"] == status
    return body
