"""Scale-out (issue 6): two or three real server processes on loopback sharing one real redis-server.

Each replica is ``alex-server serve`` with ``ALEX_REDIS_URL`` (a redis-server this module starts on a free port, see
``tests/redis_server.py``), its own ``ALEX_REPLICA_ID`` (``a``, ``b``, ``c``), its own data folder and a short task
lease (``ALEX_TASK_LEASE_SECONDS=2``), so that a dead replica's task is noticed within seconds. The replica that runs
a task says so in its log (``task_started`` with ``replica``): that is how a test finds where a task runs.

The tests that only need their own subjects and sessions share one cluster of three replicas with two task slots
each (``ALEX_WORKER_CONCURRENCY=2``) and a per-client cap of two tasks. The tests that kill a replica, stop Redis or
drain a replica get a Redis and replicas of their own.

What they prove: a stream on any replica follows a task that runs on any other, in order and whole; a stream resumes
on another replica with ``Last-Event-ID`` without a gap or a duplicate; a cancel on one replica stops a task on
another within a second; a task on a replica killed with SIGKILL is marked interrupted by another one; a Redis outage
makes the replicas unready, refuses tasks, ends streams, and heals without losing events; a draining replica finishes
its task, ends its streams for a resume elsewhere and leaves queued tasks to the others; the per-client cap, the
one-task-per-session rule and session ownership hold across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from service.client import SseMessage
from tests.integration.calls import STREAM_TIMEOUT, TERMINAL, open_stream, stored_events, submit, wait_finished
from tests.integration.replicas import (
    LEASE_SECONDS,
    Cluster,
    check_ids,
    check_problem,
    cluster,
    loop_command,
    read_to_end,
    session_name,
    subject,
    take,
    take_until_terminal,
    task_status,
    wait_for,
    wait_for_async,
)
from tests.integration.test_lifecycle import kill_leftovers, processes_matching, sleep_command
from tests.redis_server import redis_server, service_connections

pytestmark = pytest.mark.integration

CANCEL_SECONDS = 1.0
"""The spec: a cancel on any replica shows on the stream, and in the task's status, within a second."""

INTERRUPT_SECONDS = LEASE_SECONDS + 4.0
"""A dead replica's lease expires after ``LEASE_SECONDS``; a reaper runs at least every second: lease + 2 s, with
room for a loaded machine."""

OUTAGE_NOTICE_SECONDS = 2.5
"""The spec says about 2 s for the replicas to notice Redis is gone (unready, refusing tasks, streams ended)."""

OUTAGES = {"shorter-than-the-lease": LEASE_SECONDS / 2, "longer-than-the-lease": LEASE_SECONDS + 1.0}
"""How long the outage tests keep Redis down: a restart, and an outage that outlasts every lease (a running task's
replica could not renew it, yet it is alive and must not be taken for dead)."""

RECOVERY_SECONDS = 5.0
"""After Redis is back, every replica is ready again within this."""

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[Cluster]:
    with (
        redis_server(persistent=False) as redis,
        cluster(redis, NAMES, ALEX_WORKER_CONCURRENCY="2", ALEX_MAX_TASKS_PER_CLIENT="2") as replicas,
    ):
        yield replicas


@pytest.fixture
def shared(shared_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster; the replicas' log lines of this test are printed after it (shown when it failed)."""
    shared_cluster.mark_logs()
    yield shared_cluster
    shared_cluster.print_logs_since_mark()


@contextlib.asynccontextmanager
async def clients(replicas: Cluster, who: str, names: tuple[str, ...] = NAMES,
                  ) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """A client of each named replica, all with ``who``'s token."""
    async with contextlib.AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(replicas.client(name, who)) for name in names}


@contextlib.asynccontextmanager
async def streams(connections: dict[str, httpx.AsyncClient], session_id: str,
                  ) -> AsyncIterator[dict[str, AsyncGenerator[SseMessage, None]]]:
    """The session's stream on each replica, every one open (``connected`` received) before this yields."""
    async with contextlib.AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(open_stream(client, session_id))
               for name, client in connections.items()}


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["event_type"] for e in events]


def steps_seen(events: list[dict[str, Any]], marker: str) -> list[int]:
    """The step numbers a :func:`loop_command` printed, in the order its streamed output holds them."""
    output = "".join(e["chunk"] for e in events if e["event_type"] == "tool_call_stream")
    return [int(n) for n in re.findall(rf"step-(\d+)-{marker}", output)]


# Streams follow tasks across replicas


async def test_a_stream_on_every_replica_sees_every_event_of_a_task_submitted_to_another(shared: Cluster) -> None:
    who, session_id, marker = subject("alice"), session_name("fanout"), secrets.token_hex(6)
    async with clients(shared, who) as http, streams(http, session_id) as open_streams:
        task_id = await submit(http["b"], "$ " + loop_command(3, 0.05, marker), session_id)
        received = dict(zip(NAMES, await asyncio.gather(
            *(take_until_terminal(open_streams[name], task_id) for name in NAMES)), strict=True))
        runner = await shared.wait_runner(task_id)
        stored = await stored_events(http["c"], session_id)
        views = [(await http[name].get(f"/api/tasks/{task_id}")).json() for name in NAMES]

    check_ids(stored)
    assert {e["task_id"] for e in stored} == {task_id}
    assert stored[-1]["event_type"] == "task_complete", types(stored)
    assert f"step-3-{marker}" in stored[-1]["final_answer"]
    assert steps_seen(stored, marker) == [1, 2, 3]
    # The same events with the same ids, whichever replica serves the stream, whichever runs the task.
    for name, events in received.items():
        assert events == stored, f"the stream on {name} (task ran on {runner}) differs from the stored events"
    # The task reads the same from every replica.
    assert views[0]["status"] == "completed"
    assert views[1:] == [views[0]] * 2


async def test_a_stream_resumed_on_other_replicas_has_no_gap_and_no_duplicate(shared: Cluster) -> None:
    who, session_id, marker = subject("alice"), session_name("resume"), secrets.token_hex(6)
    async with clients(shared, who) as http:
        async with open_stream(http["a"], session_id) as stream:
            task_id = await submit(http["b"], "$ " + loop_command(12, 0.15, marker), session_id)
            first = await take(stream, until="tool_call_stream")
            first += await take(stream, count=2)
        await asyncio.sleep(0.3)  # events go on while nobody listens: the resume must replay them
        async with open_stream(http["c"], session_id, headers={"Last-Event-ID": first[-1]["id"]}) as stream:
            second = await take(stream, count=3)
        await asyncio.sleep(0.3)
        async with open_stream(http["b"], session_id, params={"last_event_id": second[-1]["id"]}) as stream:
            third = await take_until_terminal(stream, task_id)
        stored = await stored_events(http["a"], session_id)

    for part in (first, second):
        assert not set(types(part)) & TERMINAL, "the task ended before the reconnect: too fast to prove anything"
    union = first + second + third
    check_ids(union)
    assert union == stored, "the resumed streams differ from the stored events"
    assert union[-1]["event_type"] == "task_complete"
    assert steps_seen(union, marker) == list(range(1, 13))


# Cancel across replicas


async def test_a_cancel_on_one_replica_stops_a_task_on_another_within_a_second(shared: Cluster) -> None:
    who, session_id, command = subject("alice"), session_name("cancel"), sleep_command()
    try:
        async with clients(shared, who) as http, streams(http, session_id) as open_streams:
            task_id = await submit(http["a"], f"$ {command}", session_id)
            runner = await shared.wait_runner(task_id)
            canceller = next(name for name in NAMES if name != runner)
            await take(open_streams[canceller], until="tool_call_start")
            await wait_for(lambda: processes_matching(command, exact=True), 5, "the sleep runs")

            answer = await http[canceller].post(f"/api/tasks/{task_id}/cancel")
            answered = time.monotonic()
            assert answer.status_code == 202, answer.text
            assert answer.json()["task_id"] == task_id
            events = await take_until_terminal(open_streams[canceller], task_id)
            on_stream = time.monotonic() - answered

            async def is_cancelled() -> bool:
                return await task_status(http[canceller], task_id) == "cancelled"

            status_at = await wait_for_async(is_cancelled, max(0.0, answered + CANCEL_SECONDS - time.monotonic()),
                                             f"task {task_id} reads cancelled on {canceller}")
            # Every replica's stream ends the task the same way.
            others = {name: (await take_until_terminal(open_streams[name], task_id))[-1]
                      for name in NAMES if name != canceller}

            assert events[-1]["event_type"] == "task_cancelled", types(events)
            assert events[-1]["reason"] == "cancelled by the client"
            assert on_stream < CANCEL_SECONDS, (
                f"task_cancelled reached the stream on {canceller} {on_stream:.2f}s after the cancel answer "
                f"(task on {runner})")
            assert status_at - answered < CANCEL_SECONDS
            assert all(last == events[-1] for last in others.values()), others
            await wait_for(lambda: not processes_matching(command), 2, f"{command!r} is killed on {runner}")

            # Finished: cancelling again is a conflict on every replica; the session takes the next task.
            for name in NAMES:
                check_problem(await http[name].post(f"/api/tasks/{task_id}/cancel"), 409)
            follow_up = await submit(http[runner], "$ echo after-cancel", session_id)
            assert (await wait_finished(http[canceller], follow_up))["status"] == "completed"
    finally:
        kill_leftovers(command)


async def test_a_queued_task_is_cancelled_at_once_and_never_runs(shared: Cluster) -> None:
    command = sleep_command()
    fillers: list[tuple[str, str]] = []
    try:
        # Three replicas with two slots each: six tasks fill them all; the seventh waits in the queue.
        for index in range(6):
            owner = subject("filler")
            async with shared.client(NAMES[index % 3], owner) as filler:
                fillers.append((owner, await submit(filler, f"$ {command}", session_name("filler"))))
        runners = [await shared.wait_runner(task_id) for _, task_id in fillers]
        assert sorted(runners) == ["a", "a", "b", "b", "c", "c"], "each replica runs ALEX_WORKER_CONCURRENCY tasks"

        who, session_id = subject("alice"), session_name("queued")
        async with clients(shared, who) as http:
            queued = await submit(http["a"], "$ echo never-runs", session_id)
            await asyncio.sleep(1.0)
            assert await task_status(http["c"], queued) == "queued"
            assert not shared.runners_of(queued)

            answer = await http["c"].post(f"/api/tasks/{queued}/cancel")
            answered = time.monotonic()
            assert answer.status_code == 202, answer.text

            async def is_cancelled() -> bool:
                return await task_status(http["b"], queued) == "cancelled"

            await wait_for_async(is_cancelled, CANCEL_SECONDS, f"queued task {queued} reads cancelled")
            assert time.monotonic() - answered < CANCEL_SECONDS + 0.1
            events = [e for e in await stored_events(http["b"], session_id) if e["task_id"] == queued]
            assert types(events) == ["task_cancelled"]

            # Slots free up; the cancelled task is not run by anyone.
            for owner, task_id in fillers:
                async with shared.client("b", owner) as filler:
                    assert (await filler.post(f"/api/tasks/{task_id}/cancel")).status_code == 202
            for owner, task_id in fillers:
                async with shared.client("c", owner) as filler:
                    assert (await wait_finished(filler, task_id))["status"] == "cancelled"
            await asyncio.sleep(1.0)
            assert not shared.runners_of(queued)
            assert await task_status(http["a"], queued) == "cancelled"
    finally:
        kill_leftovers(command)


# Limits and rules across replicas


async def test_the_per_client_task_cap_counts_the_tasks_on_every_replica(shared: Cluster) -> None:
    who, command = subject("capped"), sleep_command()
    try:
        async with clients(shared, who) as http, shared.client("c", subject("other")) as other:
            first = await submit(http["a"], f"$ {command}", session_name("cap"))
            second = await submit(http["b"], f"$ {command}", session_name("cap"))
            try:
                # ALEX_MAX_TASKS_PER_CLIENT=2: one task on a and one on b use it up everywhere.
                refused_sessions = {name: session_name("refused") for name in NAMES}
                for name, refused_session in refused_sessions.items():
                    refused = await http[name].post("/api/tasks", json={"task": "$ echo third",
                                                                         "session_id": refused_session})
                    body = check_problem(refused, 429)
                    assert "ALEX_MAX_TASKS_PER_CLIENT" in body["detail"], body
                    assert int(refused.headers["retry-after"]) >= 1
                # Another subject is not affected.
                elsewhere = await submit(other, "$ echo other-subject", session_name("other"))
                assert (await wait_finished(other, elsewhere))["status"] == "completed"
            finally:
                for task_id in (first, second):
                    assert (await http["c"].post(f"/api/tasks/{task_id}/cancel")).status_code in (202, 409)
            for task_id in (first, second):
                assert (await wait_finished(http["c"], task_id))["status"] == "cancelled"
            # The cancelled tasks gave their places back, on every replica.
            again = await submit(http["c"], "$ echo after-the-cap", session_name("cap"))
            assert (await wait_finished(http["a"], again))["status"] == "completed"
            # A refused task leaves no session behind.
            left = {name: (await http["b"].get(f"/api/sessions/{refused_session}")).status_code
                    for name, refused_session in refused_sessions.items()}
            assert left == dict.fromkeys(NAMES, 404), f"sessions of refused tasks, by the replica refusing: {left}"
    finally:
        kill_leftovers(command)


async def test_a_session_runs_one_task_at_a_time_across_replicas(shared: Cluster) -> None:
    who, session_id, command = subject("alice"), session_name("busy"), sleep_command()
    try:
        async with clients(shared, who) as http:
            running_id = await submit(http["a"], f"$ {command}", session_id)
            try:
                # At once (queued or just taken), and once it surely runs: 409 from every other replica.
                body = check_problem(await http["b"].post("/api/tasks", json={"task": "$ echo too-soon",
                                                                              "session_id": session_id}), 409)
                assert running_id in body["detail"], body
                await shared.wait_runner(running_id)
                for name in ("b", "c"):
                    body = check_problem(await http[name].post("/api/tasks", json={"task": "$ echo too-soon",
                                                                                   "session_id": session_id}), 409)
                    assert running_id in body["detail"], body
            finally:
                assert (await http["b"].post(f"/api/tasks/{running_id}/cancel")).status_code in (202, 409)
            assert (await wait_finished(http["c"], running_id))["status"] == "cancelled"
            follow_up = await submit(http["c"], "$ echo next", session_id)
            assert (await wait_finished(http["b"], follow_up))["status"] == "completed"
    finally:
        kill_leftovers(command)


async def test_sessions_and_tasks_are_seen_from_every_replica_by_their_owner_only(shared: Cluster) -> None:
    alice, bob, session_id = subject("alice"), subject("bob"), session_name("owned")
    async with clients(shared, alice) as as_alice, clients(shared, bob) as as_bob:
        task_id = await submit(as_alice["a"], "$ echo owned-by-alice", session_id)
        assert (await wait_finished(as_alice["b"], task_id))["status"] == "completed"

        session = await as_alice["b"].get(f"/api/sessions/{session_id}")
        assert session.status_code == 200, session.text
        assert session.json()["id"] == session_id
        assert session.json()["messages"], "the conversation is not visible from another replica"
        for name in NAMES:
            listed = (await as_alice[name].get("/api/sessions")).json()["sessions"]
            assert session_id in listed, (name, listed)
        events = await stored_events(as_alice["c"], session_id)
        assert events == await stored_events(as_alice["a"], session_id)
        assert events[-1]["event_type"] == "task_complete"

        # Bob, on any replica, is told exactly what a session that never existed tells him.
        never = check_problem(await as_bob["b"].get("/api/sessions/never-existed"), 404)
        for name in NAMES:
            body = check_problem(await as_bob[name].get(f"/api/sessions/{session_id}"), 404)
            assert body["detail"] == never["detail"].replace("never-existed", session_id)
            check_problem(await as_bob[name].get(f"/api/sessions/{session_id}/events"), 404)
            check_problem(await as_bob[name].get("/api/sse", params={"session_id": session_id}), 404)
            check_problem(await as_bob[name].get(f"/api/tasks/{task_id}"), 404)
            check_problem(await as_bob[name].post(f"/api/tasks/{task_id}/cancel"), 404)
            check_problem(await as_bob[name].post("/api/tasks", json={"task": "$ echo x", "session_id": session_id}),
                          404)
            assert session_id not in (await as_bob[name].get("/api/sessions")).json()["sessions"]

        # Subscribing first to an id on one replica makes it yours on every replica.
        claimed = session_name("claimed")
        async with open_stream(as_bob["c"], claimed):
            for name in NAMES:
                check_problem(await as_alice[name].post("/api/tasks", json={"task": "$ echo x",
                                                                            "session_id": claimed}), 404)
                check_problem(await as_alice[name].get("/api/sse", params={"session_id": claimed}), 404)


# A replica dies


async def test_the_task_of_a_killed_replica_is_marked_interrupted_by_another() -> None:
    who, session_id, command = subject("alice"), session_name("killed"), sleep_command()
    with redis_server(persistent=False) as redis, cluster(redis, ("a", "b")) as replicas:
        try:
            async with clients(replicas, who, ("a", "b")) as http, streams(http, session_id) as open_streams:
                task_id = await submit(http["a"], f"$ {command}", session_id)
                runner = await replicas.wait_runner(task_id)
                survivor = "b" if runner == "a" else "a"
                before = await take(open_streams[survivor], until="tool_call_start")
                await wait_for(lambda: processes_matching(command, exact=True), 5, "the sleep runs")

                replicas[runner].kill()  # SIGKILL: no drain, no shutdown, the lease is simply no longer renewed
                killed = time.monotonic()
                after = await take_until_terminal(open_streams[survivor], task_id)
                noticed = time.monotonic() - killed

                last = after[-1]
                assert last["event_type"] == "error", types(after)
                assert last["recoverable"] is False
                assert noticed < INTERRUPT_SECONDS, f"the stream on {survivor} said so {noticed:.1f}s after the kill"

                task = (await http[survivor].get(f"/api/tasks/{task_id}")).json()
                assert task["status"] == "interrupted", task
                assert task["error"] == last["error"]
                assert "stop" in task["error"].lower(), task["error"]
                assert task["finished_at"] is not None
                stored = await stored_events(http[survivor], session_id)
                check_ids(stored)
                assert stored == before + after, "the survivor's stream differs from the stored events"

                # It cannot be cancelled any more; the session takes new work, on the survivor.
                check_problem(await http[survivor].post(f"/api/tasks/{task_id}/cancel"), 409)
                again = await submit(http[survivor], "$ echo after-the-kill", session_id)
                assert (await wait_finished(http[survivor], again))["status"] == "completed"
                assert replicas.runners_of(again) == [survivor]
        finally:
            # Without bubblewrap, a SIGKILLed server leaves its tools' processes behind.
            kill_leftovers(command)


async def test_streams_replaying_at_once_beyond_the_redis_pool_wait_for_it_and_get_everything() -> None:
    """Fifteen times more streams replay at once than the replica's Redis pool has connections
    (``ALEX_REDIS_MAX_CONNECTIONS``): they wait for one, and each gets the whole history; none ends early."""
    who, session_id, marker = subject("burst"), session_name("burst"), secrets.token_hex(6)
    with (
        redis_server(persistent=False) as redis,
        cluster(redis, ("a",), ALEX_REDIS_MAX_CONNECTIONS="4", ALEX_MAX_STREAMS_PER_CLIENT="100") as replicas,
    ):
        async with replicas.client("a", who) as http:
            task_id = await submit(http, "$ " + loop_command(3, 0.01, marker), session_id)
            assert (await wait_finished(http, task_id))["status"] == "completed"
            stored = await stored_events(http, session_id)

            async def replay() -> list[dict[str, Any]]:
                async with open_stream(http, session_id) as stream:
                    return await take_until_terminal(stream, task_id)

            replays = await asyncio.gather(*(replay() for _ in range(60)))
            # The pool kept to its size: 4, and the event and queue readers' own.
            assert await service_connections(redis) <= 4 + 2
    assert stored[-1]["event_type"] == "task_complete"
    assert steps_seen(stored, marker) == [1, 2, 3]
    for events in replays:
        assert events == stored


# Redis goes away and comes back


@pytest.mark.parametrize("outage_seconds", list(OUTAGES.values()), ids=list(OUTAGES))
async def test_a_redis_outage_makes_replicas_unready_ends_streams_and_heals_without_losing_events(
        outage_seconds: float) -> None:
    who, session_id, marker = subject("alice"), session_name("outage"), secrets.token_hex(6)
    steps = 20  # 0.25 s apart: the task outlives the outage
    with redis_server() as redis, cluster(redis, ("a", "b")) as replicas:
        async with clients(replicas, who, ("a", "b")) as http:
            async with streams(http, session_id) as open_streams:
                task_id = await submit(http["a"], "$ " + loop_command(steps, 0.25, marker), session_id)
                runner = await replicas.wait_runner(task_id)
                received = {name: await take(open_streams[name], until="tool_call_stream") for name in ("a", "b")}

                await asyncio.to_thread(redis.stop)
                stopped = time.monotonic()
                # Open streams end (the response finishes) so that clients reconnect elsewhere.
                rests = await asyncio.gather(*(read_to_end(open_streams[name], OUTAGE_NOTICE_SECONDS)
                                               for name in ("a", "b")))
                for name, rest in zip(("a", "b"), rests, strict=True):
                    received[name] += rest
                streams_ended = time.monotonic() - stopped

            async def unready() -> bool:
                answers = [await http[name].get("/ready") for name in ("a", "b")]
                return all(a.status_code == 503 for a in answers)

            await wait_for_async(unready, max(0.0, stopped + OUTAGE_NOTICE_SECONDS - time.monotonic()),
                                 "/ready answers 503 on both replicas while Redis is down")
            for name in ("a", "b"):
                refused = await http[name].post("/api/tasks", json={"task": "$ echo during-the-outage",
                                                                     "session_id": session_name("refused")})
                check_problem(refused, 503)
                health = await http[name].get("/health")
                assert health.status_code == 200, health.text
            assert streams_ended < OUTAGE_NOTICE_SECONDS
            # The task goes on meanwhile, its events waiting in its replica's buffer.
            await asyncio.sleep(max(0.0, stopped + outage_seconds - time.monotonic()))
            assert processes_matching(marker), "the running task's command stopped while Redis was down"

            await asyncio.to_thread(redis.start)

            async def ready() -> bool:
                answers = [await http[name].get("/ready") for name in ("a", "b")]
                return all(a.status_code == 200 for a in answers)

            await wait_for_async(ready, RECOVERY_SECONDS, "/ready answers 200 on both replicas once Redis is back")

            task = await wait_finished(http["b"], task_id)
            assert task["status"] == "completed", task
            assert f"step-{steps}-{marker}" in task["final_answer"]
            stored = await stored_events(http["b"], session_id)
            check_ids(stored)
            assert {e["task_id"] for e in stored} == {task_id}
            assert stored[-1]["event_type"] == "task_complete", types(stored)
            assert steps_seen(stored, marker) == list(range(1, steps + 1)), "output events were lost or repeated"
            for name, events in received.items():
                assert events == stored[:len(events)], f"what the stream on {name} got before the outage changed"

            # Streams resumed after the outage, on either replica, get the rest, then a new task's events live.
            async with contextlib.AsyncExitStack() as stack:
                resumed_streams = {
                    name: await stack.enter_async_context(open_stream(
                        http[name], session_id, headers={"Last-Event-ID": received[name][-1]["id"]}))
                    for name in ("a", "b")}
                for name, stream in resumed_streams.items():
                    resumed = await take_until_terminal(stream, task_id)
                    assert received[name] + resumed == stored, f"the stream resumed on {name} differs"
                new_task = await submit(http["a"], "$ echo after-the-outage", session_id)
                new_events = {name: await take_until_terminal(stream, new_task)
                              for name, stream in resumed_streams.items()}
            for name, events in new_events.items():
                assert events[-1]["event_type"] == "task_complete", (name, types(events))
                assert "after-the-outage" in events[-1]["final_answer"]
                check_ids(stored + events)
            assert new_events["a"] == new_events["b"]
            for name in ("a", "b"):
                assert not replicas.logged(name, "task_interrupted"), f"task on {runner} was taken for dead"
            # Checked last, so that a wrong log line does not hide the behaviour above.
            for name in ("a", "b"):
                closed = replicas.logged(name, "sse_stream_closed", session_id=session_id)
                assert closed[0]["reason"] == "redis_unavailable", (name, closed)


# A replica drains


async def test_a_draining_replica_finishes_its_task_ends_its_streams_and_leaves_queued_tasks() -> None:
    who, marker, blocker_command, grace = subject("alice"), secrets.token_hex(6), sleep_command(), 5.0
    with (
        redis_server(persistent=False) as redis,
        cluster(redis, ("a", "b"), start=False, ALEX_WORKER_CONCURRENCY="1",
                ALEX_SHUTDOWN_GRACE_SECONDS=str(grace)) as replicas,
    ):
        try:
            # b starts alone and takes a task that keeps its only slot busy.
            replicas.start("b")
            async with replicas.client("b", who) as on_b:
                blocker = await submit(on_b, f"$ {blocker_command}", session_name("blocker"))
                assert await replicas.wait_runner(blocker) == "b"
                await asyncio.to_thread(replicas.start, "a")

                session_id = session_name("draining")
                async with replicas.client("a", who) as on_a, open_stream(on_a, session_id) as stream:
                    moving = await submit(on_a, "$ " + loop_command(8, 0.25, marker), session_id)
                    assert await replicas.wait_runner(moving) == "a"
                    # Both slots are taken: this one waits in the queue.
                    queued = await submit(on_b, f"$ echo queued-{marker}", session_name("queued"))
                    received = await take(stream, until="tool_call_stream")

                    signalled = time.monotonic()
                    stopping = asyncio.create_task(asyncio.to_thread(replicas["a"].stop))
                    received += await read_to_end(stream, STREAM_TIMEOUT)
                    stream_ended = time.monotonic() - signalled

                assert stream_ended < 1.0, f"the stream on a ended {stream_ended:.2f}s after SIGTERM"
                assert not set(types(received)) & TERMINAL, "the task ended before the drain: too fast"
                # The client resumes on b and misses nothing of the task a goes on running.
                async with open_stream(on_b, session_id, headers={"Last-Event-ID": received[-1]["id"]}) as resumed:
                    rest = await take_until_terminal(resumed, moving)
                exit_seconds = await stopping
                assert exit_seconds < grace + 1.5, f"a took {exit_seconds:.1f}s to exit"

                union = received + rest
                check_ids(union)
                assert union == await stored_events(on_b, session_id)
                assert union[-1]["event_type"] == "task_complete", types(union)
                assert steps_seen(union, marker) == list(range(1, 9))
                assert (await wait_finished(on_b, moving))["status"] == "completed"
                assert replicas.logged("a", "drain_started")
                closed = replicas.logged("a", "sse_stream_closed", session_id=session_id)
                assert [r["reason"] for r in closed] == ["draining"], closed

                # The queued task stayed in the queue: a did not take it while draining; b runs it once free.
                assert await task_status(on_b, queued) == "queued"
                assert not replicas.runners_of(queued)
                assert (await on_b.post(f"/api/tasks/{blocker}/cancel")).status_code == 202
                done = await wait_finished(on_b, queued)
                assert done["status"] == "completed", done
                assert replicas.runners_of(queued) == ["b"]
        finally:
            kill_leftovers(blocker_command)
