"""A task's life on the real server: cancel (its processes die), one task per session, restart, crash, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import SseMessage
from tests.integration.calls import STREAM_TIMEOUT, TERMINAL, open_stream, submit, wait_finished
from tests.integration.server import ServerProcess, auth, data_folder, running

pytestmark = pytest.mark.integration

INTERRUPTED_BY_RESTART = "the server stopped while the task ran"
INTERRUPTED_BY_SHUTDOWN = "the server shut down before the task finished"


def sleep_command() -> str:
    """``sleep 30.77…`` with random digits, so that this test's process is told apart from any other."""
    return f"sleep 30.77{secrets.randbelow(10**6):06d}"


def processes_matching(text: str, *, exact: bool = False) -> list[int]:
    """Pids whose command line contains ``text`` (as ``pgrep -f`` would find them), or is ``text`` when ``exact``
    (the command itself, not the sandbox and shell that wrap it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.strip() == text if exact else text in cmdline:
            found.append(int(entry.name))
    return found


async def wait_until(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.02)


def kill_leftovers(text: str) -> list[int]:
    """Kill (by pid) processes this test started that outlived their server; returns their pids."""
    pids = processes_matching(text)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids




@pytest.fixture
def data_dir() -> Iterator[Path]:
    with data_folder() as folder:
        yield folder


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ServerProcess]:
    with running(ALEX_TOOL_OUTPUT_LIMIT_BYTES="20000000") as process:
        yield process


async def take_until(messages: AsyncIterator[SseMessage], event_type: str | frozenset[str]) -> list[dict[str, Any]]:
    kinds = frozenset({event_type}) if isinstance(event_type, str) else event_type
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages:
            events.append(message.json())
            if message.event in kinds:
                return events
    raise AssertionError(f"the stream ended before {sorted(kinds)}: {[e['event_type'] for e in events]}")


def check_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status
    return body


async def all_events(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/sessions/{session_id}/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


# Cancel


async def test_cancel_stops_the_task_and_kills_its_process(shared_server: ServerProcess) -> None:
    command = sleep_command()
    async with httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        async with open_stream(client, "cancel-session") as stream:
            task_id = await submit(client, f"$ {command}", "cancel-session")
            started = await take_until(stream, "tool_call_start")
            assert started[-1]["arguments"] == {"command": command}
            await wait_until(lambda: processes_matching(command, exact=True), 5, "the sleep runs")

            # Cancelling is idempotent while the task stops (202), and a conflict once it has stopped (409). The
            # requests go out at once on connections opened beforehand; stopping takes only milliseconds, so
            # which of them still find it stopping is up to the scheduler, but none may fail otherwise.
            await asyncio.gather(*(client.get("/health") for _ in range(4)))
            answers = await asyncio.gather(*(client.post(f"/api/tasks/{task_id}/cancel") for _ in range(4)))
            assert 202 in [a.status_code for a in answers], [a.text for a in answers]
            for answer in answers:
                if answer.status_code == 202:
                    assert answer.json()["task_id"] == task_id
                else:
                    assert check_problem(answer, 409)["detail"] == f"task {task_id} is already cancelled"

            cancelled = await take_until(stream, TERMINAL)
        assert cancelled[-1]["event_type"] == "task_cancelled"
        assert cancelled[-1]["reason"] == "cancelled by the client"
        assert cancelled[-1]["task_id"] == task_id
        assert "tool_call_complete" not in [e["event_type"] for e in cancelled[:-1]]

        task = await wait_finished(client, task_id)
        assert task["status"] == "cancelled"
        assert task["finished_at"] is not None
        await wait_until(lambda: not processes_matching(command), 2, f"{command!r} is killed")

        # Finished: cancelling again is a conflict.
        check_problem(await client.post(f"/api/tasks/{task_id}/cancel"), 409)
        # The conversation stays valid for the model: the interrupted call has its result.
        messages = (await client.get("/api/sessions/cancel-session")).json()["messages"]
        assert [m["role"] for m in messages[-2:]] == ["assistant", "tool"]
        assert messages[-1]["tool_call_id"] == messages[-2]["tool_calls"][0]["id"]
        assert "cancelled" in messages[-1]["content"]
        # The session takes a new task at once.
        follow_up = await submit(client, "$ echo after-cancel", "cancel-session")
        assert (await wait_finished(client, follow_up))["status"] == "completed"


async def test_cancel_of_an_unknown_task_is_404(shared_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        check_problem(await client.post("/api/tasks/t_0000000000000000/cancel"), 404)
        check_problem(await client.post("/api/tasks/no-such-task/cancel"), 404)


async def test_a_second_task_on_a_busy_session_is_409(shared_server: ServerProcess) -> None:
    command = sleep_command()
    async with httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        running_id = await submit(client, f"$ {command}", "busy-session")
        try:
            refused = await client.post("/api/tasks", json={"task": "$ echo too-soon", "session_id": "busy-session"})
            body = check_problem(refused, 409)
            assert running_id in body["detail"]
            # Another session of the same subject is not blocked.
            other = await submit(client, "$ echo elsewhere", "not-busy-session")
            assert (await wait_finished(client, other))["status"] == "completed"
            assert (await client.get(f"/api/tasks/{running_id}")).json()["status"] in ("queued", "running")
        finally:
            assert (await client.post(f"/api/tasks/{running_id}/cancel")).status_code in (202, 409)
        assert (await wait_finished(client, running_id))["status"] == "cancelled"
    await wait_until(lambda: not processes_matching(command), 2, "the sleep is killed")


async def test_once_the_terminal_event_is_out_the_task_is_stored_finished(shared_server: ServerProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as client,
        open_stream(client, "settled-session") as stream,
    ):
        for round_number in range(6):
            # A long conversation (megabytes of output in it) makes storing the session's messages take a while.
            command = f"echo round-{round_number}" if round_number else "head -c 8000000 /dev/zero | tr '\\0' x; echo"
            # Right after the terminal event: the next task is accepted, and the previous one reads as done.
            task_id = await submit(client, f"$ {command}", "settled-session")
            done = (await take_until(stream, TERMINAL))[-1]
            assert done["event_type"] == "task_complete"
            task = (await client.get(f"/api/tasks/{task_id}")).json()
            assert (task["status"], task["final_answer"]) == ("completed", done["final_answer"])


# Restart, crash, SIGTERM


async def test_a_restart_keeps_sessions_tasks_and_events(data_dir: Path) -> None:
    data = data_dir
    with running(data) as before:
        async with httpx.AsyncClient(base_url=before.base_url, headers=auth("alice"), timeout=10.0) as client:
            task_id = await submit(client, "$ echo before-restart", "durable")
            assert (await wait_finished(client, task_id))["status"] == "completed"
            old_task = (await client.get(f"/api/tasks/{task_id}")).json()
            old_session = (await client.get("/api/sessions/durable")).json()
            old_events = await all_events(client, "durable")
        assert before.stop() < 10
        assert before.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert before.events_logged("server_stopped")

    with running(data) as after:
        async with httpx.AsyncClient(base_url=after.base_url, headers=auth("alice"), timeout=10.0) as client:
            assert (await client.get("/api/sessions")).json() == {"sessions": ["durable"]}
            assert (await client.get(f"/api/tasks/{task_id}")).json() == old_task
            assert (await client.get("/api/sessions/durable")).json() == old_session
            assert await all_events(client, "durable") == old_events

            # A new task continues the session; its events come after the old ones, on a resumed stream too.
            async with open_stream(client, "durable", headers={"Last-Event-ID": old_events[-1]["id"]}) as stream:
                new_id = await submit(client, "$ echo after-restart", "durable")
                new_events = await take_until(stream, TERMINAL)
            assert {e["task_id"] for e in new_events} == {new_id}
            assert new_events[-1]["event_type"] == "task_complete"
            assert min(int(e["id"]) for e in new_events) > max(int(e["id"]) for e in old_events)
            assert await all_events(client, "durable") == old_events + new_events
            messages = (await client.get("/api/sessions/durable")).json()["messages"]
            assert messages[:len(old_session["messages"])] == old_session["messages"]
            assert len(messages) > len(old_session["messages"])


async def test_after_a_crash_the_running_task_is_interrupted(data_dir: Path) -> None:
    data = data_dir
    command = sleep_command()
    try:
        with running(data) as crashed:
            async with (
                httpx.AsyncClient(base_url=crashed.base_url, headers=auth("alice"), timeout=10.0) as client,
                open_stream(client, "crashed") as stream,
            ):
                task_id = await submit(client, f"$ {command}", "crashed")
                before = await take_until(stream, "tool_call_start")
                await wait_until(lambda: processes_matching(command, exact=True), 5, "the sleep runs")
                crashed.kill()  # SIGKILL: no drain, no shutdown
            if shutil.which("bwrap") is not None:
                # Bubblewrap (--die-with-parent) takes the tool's processes down with the server.
                await wait_until(lambda: not processes_matching(command), 2, f"{command!r} dies with the server")

        with running(data) as restarted:
            async with httpx.AsyncClient(base_url=restarted.base_url, headers=auth("alice"), timeout=10.0) as client:
                task = (await client.get(f"/api/tasks/{task_id}")).json()
                assert task["status"] == "interrupted"
                assert task["error"] == INTERRUPTED_BY_RESTART
                assert task["finished_at"] is not None
                events = await all_events(client, "crashed")
                last = events[-1]
                assert last["event_type"] == "error"
                assert last["task_id"] == task_id
                assert last["error"] == INTERRUPTED_BY_RESTART
                assert last["recoverable"] is False
                assert int(last["id"]) > int(before[-1]["id"])
                # Cancelling it now is a conflict, and the session takes new work.
                check_problem(await client.post(f"/api/tasks/{task_id}/cancel"), 409)
                again = await submit(client, "$ echo after-crash", "crashed")
                assert (await wait_finished(client, again))["status"] == "completed"
    finally:
        # Without bubblewrap, a SIGKILLed server leaves its tools' processes behind: clean up what this started.
        kill_leftovers(command)


async def test_sigterm_ends_streams_at_once_and_interrupts_running_tasks(data_dir: Path) -> None:
    data = data_dir
    command = sleep_command()
    grace = 2.0
    with running(data, ALEX_SHUTDOWN_GRACE_SECONDS=str(grace)) as server:
        async with (
            httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client,
            open_stream(client, "draining") as stream,
        ):
            task_id = await submit(client, f"$ {command}", "draining")
            await take_until(stream, "tool_call_start")
            await wait_until(lambda: processes_matching(command, exact=True), 5, "the sleep runs")

            async def stream_end() -> float:
                async with asyncio.timeout(STREAM_TIMEOUT):
                    async for _ in stream:
                        pass
                return time.monotonic()

            ended = asyncio.create_task(stream_end())
            signalled = time.monotonic()
            exit_seconds = await asyncio.to_thread(server.stop, signal.SIGTERM)
            stream_ended = await ended
        assert server.process.returncode in (0, -signal.SIGTERM)
        assert stream_ended - signalled < 1.0, f"the stream ended {stream_ended - signalled:.2f}s after SIGTERM"
        assert stream_ended < signalled + exit_seconds, "the stream outlived the process"
        assert exit_seconds < grace + 1.5, f"exit took {exit_seconds:.2f}s"
        assert server.events_logged("drain_started")
    assert not processes_matching(command), f"{command!r} outlived the server"

    with running(data) as restarted:
        async with httpx.AsyncClient(base_url=restarted.base_url, headers=auth("alice"), timeout=10.0) as client:
            task = (await client.get(f"/api/tasks/{task_id}")).json()
            assert task["status"] == "interrupted"
            assert task["error"] == INTERRUPTED_BY_SHUTDOWN
            events = await all_events(client, "draining")
            assert events[-1]["event_type"] == "task_cancelled"
            assert events[-1]["reason"] == INTERRUPTED_BY_SHUTDOWN
            assert events[-1]["task_id"] == task_id
