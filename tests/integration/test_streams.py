"""The event stream over real sockets: per-session filtering, resuming with Last-Event-ID, slow clients, access."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.client import SseMessage
from tests.integration.calls import STREAM_TIMEOUT, TERMINAL, open_stream, stored_events, submit
from tests.integration.server import ServerProcess, auth, running, token

pytestmark = pytest.mark.integration





@pytest.fixture(scope="module")
def shared_server() -> Iterator[ServerProcess]:
    """A default server for the tests that only need their own session ids."""
    with running() as process:
        yield process


@pytest.fixture(scope="module")
def paced_server() -> Iterator[ServerProcess]:
    """The mock model at 20 ms a token, so that a task lasts about a second."""
    with running(ALEX_MOCK_DELAY_MS="20") as process:
        yield process


async def take(messages: AsyncIterator[SseMessage], count: int | None = None,
               until_task: str | None = None) -> list[dict[str, Any]]:
    """``count`` events, or the events up to ``until_task``'s terminal one; each checked against its SSE frame."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages:
            body = message.json()
            assert (message.event, message.id) == (body["event_type"], body["id"])
            events.append(body)
            if count is not None and len(events) == count:
                break
            if until_task is not None and body["task_id"] == until_task and body["event_type"] in TERMINAL:
                break
        else:
            raise AssertionError(f"the stream ended after {len(events)} events")
    return events




def check_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status
    return body


# Filtering


async def test_two_sessions_at_once_never_see_each_others_events(paced_server: ServerProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=paced_server.base_url, headers=auth("alice"), timeout=10.0) as client,
        open_stream(client, "filter-a") as stream_a,
        open_stream(client, "filter-b") as stream_b,
    ):
        task_a = await submit(client, "$ echo only-for-a; seq 1 5", "filter-a")
        task_b = await submit(client, "$ echo only-for-b; seq 1 5", "filter-b")
        events_a, events_b = await asyncio.gather(take(stream_a, until_task=task_a),
                                                  take(stream_b, until_task=task_b))
    for session_id, task_id, events, marker in (("filter-a", task_a, events_a, "only-for-a"),
                                                 ("filter-b", task_b, events_b, "only-for-b")):
        assert {e["session_id"] for e in events} == {session_id}
        assert {e["task_id"] for e in events} == {task_id}
        assert events[-1]["event_type"] == "task_complete"
        assert marker in events[-1]["final_answer"]
    ids_a = [int(e["id"]) for e in events_a]
    ids_b = [int(e["id"]) for e in events_b]
    assert not set(ids_a) & set(ids_b)
    # The two tasks really ran at the same time: their ids interleave.
    assert min(ids_b) < max(ids_a)
    assert min(ids_a) < max(ids_b)


# Resuming


async def test_reconnecting_with_last_event_id_misses_nothing_and_repeats_nothing(
        paced_server: ServerProcess) -> None:
    session_id = "resume-session"
    async with httpx.AsyncClient(base_url=paced_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        async with open_stream(client, session_id) as stream:
            task_id = await submit(client, "$ seq 1 40", session_id)
            first = await take(stream, 5)
        await asyncio.sleep(0.2)  # events go on while nobody listens; the resume must replay them
        async with open_stream(client, session_id, headers={"Last-Event-ID": first[-1]["id"]}) as stream:
            second = await take(stream, 5)
        await asyncio.sleep(0.2)
        async with open_stream(client, session_id, params={"last_event_id": second[-1]["id"]}) as stream:
            third = await take(stream, until_task=task_id)
        stored = await stored_events(client, session_id, page_size=50)

    for part in (first, second):
        assert not {e["event_type"] for e in part} & TERMINAL, "the task ended before the reconnect: too fast"
    union = first + second + third
    ids = [int(e["id"]) for e in union]
    assert len(ids) == len(set(ids)), "an event came twice"
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"ids not contiguous: {ids}"
    assert union == stored, "the resumed streams differ from the stored events"
    assert union[-1]["event_type"] == "task_complete"


async def test_an_invalid_last_event_id_is_400(shared_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        for headers, params in (({"Last-Event-ID": "abc"}, {}), ({"Last-Event-ID": "-3"}, {}),
                                ({"Last-Event-ID": "1.5"}, {}), ({}, {"last_event_id": "abc"}),
                                ({}, {"last_event_id": "-1"})):
            response = await client.get("/api/sse", params={"session_id": "bad-resume", **params}, headers=headers)
            check_problem(response, 400)


async def test_the_stream_has_the_headers_proxies_need(shared_server: ServerProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as client,
        client.stream("GET", "/api/sse", params={"session_id": "headers-session"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"


# Access


async def test_another_subject_cannot_follow_a_session(shared_server: ServerProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as alice,
        httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("bob"), timeout=10.0) as bob,
    ):
        await submit(alice, "$ echo alice-only", "alice-private")
        refused = await bob.get("/api/sse", params={"session_id": "alice-private"})
        body = check_problem(refused, 404)
        # Exactly what a session that never existed answers: nothing tells bob that alice has it.
        missing = check_problem(await bob.get("/api/sessions/never-existed"), 404)
        assert body["detail"] == missing["detail"].replace("never-existed", "alice-private")
        check_problem(await bob.get("/api/sessions/alice-private"), 404)

        # Subscribing first to an id makes it yours: the later "owner" is refused, and sees none of it.
        async with open_stream(bob, "claimed-by-bob") as bob_stream:
            check_problem(await alice.post("/api/tasks", json={"task": "$ echo x", "session_id": "claimed-by-bob"}),
                          404)
            check_problem(await alice.get("/api/sse", params={"session_id": "claimed-by-bob"}), 404)
            bob_task = await submit(bob, "$ echo bob-owns-it", "claimed-by-bob")
            events = await take(bob_stream, until_task=bob_task)
        assert {e["task_id"] for e in events} == {bob_task}


async def test_a_stream_on_a_deleted_session_never_sees_the_next_owners_events(
        shared_server: ServerProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as alice,
        httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("bob"), timeout=10.0) as bob,
    ):
        async with open_stream(alice, "reused-id") as stream:
            alice_task = await submit(alice, "$ echo alice-was-here", "reused-id")
            await take(stream, until_task=alice_task)
            assert (await alice.delete("/api/sessions/reused-id")).status_code == 204
            # The id is free again; bob takes it.
            bob_task = await submit(bob, "$ echo bob-secret", "reused-id")
            leaked: list[dict[str, Any]] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for message in stream:
                        leaked.append(message.json())
        assert (await bob.get(f"/api/tasks/{bob_task}")).status_code == 200
    assert leaked == [], f"alice's old stream received bob's events: {[e['event_type'] for e in leaked]}"


# A slow client


def raw_stream_request(port: int, session_id: str, bearer: str) -> bytes:
    lines = [f"GET /api/sse?session_id={session_id} HTTP/1.1", f"Host: 127.0.0.1:{port}",
             f"Authorization: Bearer {bearer}", "Accept: text/event-stream"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def dechunk(body: bytes) -> bytes:
    """A chunked body's data, as far as it is complete (the server may cut a slow client mid-chunk)."""
    out = bytearray()
    position = 0
    while True:
        end = body.find(b"\r\n", position)
        if end < 0:
            return bytes(out)
        size = int(body[position:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        start = end + 2
        out += body[start:start + size]  # of a chunk cut short, what arrived
        if start + size > len(body):
            return bytes(out)
        position = start + size + 2


def complete_events(data: bytes) -> list[dict[str, Any]]:
    """The events whose frame arrived whole (ended by a blank line); comments and ``connected`` left out."""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    frames = text.split("\n\n")[:-1]  # what follows the last blank line is unfinished
    events: list[dict[str, Any]] = []
    for frame in frames:
        fields: dict[str, str] = {}
        for line in frame.split("\n"):
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "id" not in fields:
            continue
        body = json.loads(fields["data"])
        assert (fields["event"], fields["id"]) == (body["event_type"], body["id"])
        events.append(body)
    return events


def wait_for_log(server: ServerProcess, predicate: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in list(server.logs):
            if predicate(record):
                return record
        time.sleep(0.05)
    raise AssertionError("no such log line; the last ones: " + "\n".join(server.raw_logs[-20:]))


def recv_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything until the server closes the connection or ends the chunked body."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while not received.endswith(b"\r\n0\r\n\r\n"):
        if time.monotonic() > deadline:
            raise AssertionError("the server never closed the slow client's stream")
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


def follow_sync(client: httpx.Client, session_id: str, task_id: str, last_event_id: str) -> list[dict[str, Any]]:
    """The events after ``last_event_id`` through ``task_id``'s terminal one, on a stream resumed with the header."""
    events: list[dict[str, Any]] = []
    with client.stream("GET", "/api/sse", params={"session_id": session_id},
                       headers={"Last-Event-ID": last_event_id}) as stream:
        assert stream.status_code == 200
        data: list[str] = []
        for line in stream.iter_lines():
            if line.startswith("data:"):
                data.append(line.removeprefix("data: "))
            elif line == "" and data:
                body = json.loads("\n".join(data))
                data = []
                if "event_type" not in body:
                    continue  # connected
                events.append(body)
                if body["task_id"] == task_id and body["event_type"] in TERMINAL:
                    return events
    raise AssertionError(f"the resumed stream ended after {len(events)} events")


@dataclass
class SlowClientRun:
    server: ServerProcess
    closed: dict[str, Any]
    received: list[dict[str, Any]]
    resumed: list[dict[str, Any]]
    stored: list[dict[str, Any]]


@pytest.fixture(scope="module")
def slow_client_run() -> Iterator[SlowClientRun]:
    """A client that opens a stream on a raw socket with a small receive buffer and then reads nothing while a
    task streams ~18 MB of output in 60 KB lines; once the server has cut it off as slow, it reads what it got and
    resumes with the Last-Event-ID of the last whole event."""
    session_id = "slow-session"
    command = "for i in $(seq 300); do head -c 60000 /dev/zero | tr '\\0' x; echo; done"
    # The model's own text at 1 ms a token, so that only the socket, not a burst of deltas, makes the client slow.
    with running(ALEX_SSE_BUFFER_SIZE="5", ALEX_MOCK_DELAY_MS="1",
                 ALEX_TOOL_OUTPUT_LIMIT_BYTES="50000000", ALEX_SSE_HEARTBEAT_SECONDS="1") as server, httpx.Client(
            base_url=server.base_url, headers=auth("alice"), timeout=30.0) as client:
        assert server.port is not None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(0.5)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(raw_stream_request(server.port, session_id, token("alice")))
            # Only as much as shows the stream is open (subscribed), then nothing for a while.
            head = bytearray()
            deadline = time.monotonic() + 10
            while b"event: connected" not in head and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    head += sock.recv(512)
            assert head.startswith(b"HTTP/1.1 200"), bytes(head)

            response = client.post("/api/tasks", json={"task": f"$ {command}", "session_id": session_id})
            assert response.status_code == 202, response.text
            task_id = response.json()["task_id"]
            closed = wait_for_log(server, lambda r: r.get("event") == "sse_stream_closed"
                                  and r.get("session_id") == session_id, timeout=60)
            received = bytes(head) + recv_until_closed(sock, timeout=30)
        _, _, body = received.partition(b"\r\n\r\n")
        got = complete_events(dechunk(body))
        assert got, "not one whole event reached the slow client"
        resumed = follow_sync(client, session_id, task_id, got[-1]["id"])
        stored: list[dict[str, Any]] = []
        after = "0"
        while after is not None:
            page = client.get(f"/api/sessions/{session_id}/events", params={"after": after, "limit": 100}).json()
            stored.extend(page["events"])
            after = page["next_after"]
        yield SlowClientRun(server, closed, got, resumed, stored)


def test_a_slow_client_is_cut_off_and_recovers_everything_with_last_event_id(slow_client_run: SlowClientRun) -> None:
    run = slow_client_run
    assert run.closed["reason"] == "slow_client", run.closed
    assert run.closed["dropped"] > 0
    assert not any(e["event_type"] == "task_complete" for e in run.received), "the client was never slow"
    assert run.stored[-1]["event_type"] == "task_complete"
    assert len([e for e in run.stored if e["event_type"] == "tool_call_stream"]) == 300
    union = run.received + run.resumed
    assert [e["id"] for e in union] == [e["id"] for e in run.stored], "an event was lost or repeated"
    assert union == run.stored


def test_a_slow_client_is_not_logged_as_a_server_failure(slow_client_run: SlowClientRun) -> None:
    logs = slow_client_run.server.logs
    assert not [r for r in logs if r.get("event") == "request_failed"]
    assert not [r["event"] for r in logs if "exception" in r], "a traceback was logged for a slow client"


async def test_a_client_that_keeps_up_is_not_cut_off_by_a_burst_of_output(shared_server: ServerProcess) -> None:
    async with (
        httpx.AsyncClient(base_url=shared_server.base_url, headers=auth("alice"), timeout=10.0) as client,
        open_stream(client, "burst-session") as stream,
    ):
        task_id = await submit(client, "$ seq 1 3000", "burst-session")
        events = await take(stream, until_task=task_id)
    assert events[-1]["event_type"] == "task_complete"
    cut = [r for r in shared_server.logs
           if r.get("event") == "sse_stream_closed" and r.get("session_id") == "burst-session"]
    assert not cut, cut
