"""Two subjects, one server: another subject's session (its events, tasks, workspace, its very existence) stays out
of reach, whatever id is guessed and whoever subscribes first; invalid session ids never escape the workspaces."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from service.client import SseMessage
from tests.integration.calls import STREAM_TIMEOUT, TERMINAL, open_stream, submit
from tests.integration.server import ServerProcess, auth

pytestmark = pytest.mark.integration

NOT_FOUND_HINTS = ("forbidden", "permission", "owner", "belongs", "alice", "not allowed", "access")


@contextlib.contextmanager
def data_folder() -> Iterator[Path]:
    """A data folder outside pytest's base temp folder (0700, and reset by a concurrent pytest session), which the
    bash sandbox's user must be able to pass through."""
    root = Path(tempfile.mkdtemp(prefix="alex-iso-"))
    root.chmod(0o711)
    try:
        yield root / "data"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with data_folder() as folder:
        process = ServerProcess(folder).start()
        try:
            yield process
        finally:
            process.kill()


def new_id(prefix: str = "iso") -> str:
    """Ids of one length, so that a 404 about one id and a 404 about another can be compared byte for byte."""
    return f"{prefix}-{secrets.token_hex(8)}"


def new_task_id() -> str:
    return f"t_{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Owned:
    session_id: str
    task_id: str
    marker: str


def wait_finished(client: httpx.Client, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = client.get(f"/api/tasks/{task_id}")
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        if view["status"] not in ("queued", "running"):
            return view
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish")


@pytest.fixture(scope="module")
def alices(server: ServerProcess) -> Owned:
    """A session of alice's with a finished task that wrote a file into her workspace."""
    marker = "alice-secret-" + secrets.token_hex(6)
    session_id = new_id()
    with httpx.Client(base_url=server.base_url, headers=auth("alice"), timeout=10) as alice:
        response = alice.post("/api/tasks", json={"task": f"$ echo {marker} | tee notes.txt",
                                                  "session_id": session_id})
        assert response.status_code == 202, response.text
        task_id: str = response.json()["task_id"]
        view = wait_finished(alice, task_id)
    assert view["status"] == "completed"
    assert marker in (view["final_answer"] or "")
    return Owned(session_id, task_id, marker)


@pytest.fixture
async def bob(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("bob"), timeout=10) as client:
        yield client


@pytest.fixture
async def alice(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10) as client:
        yield client


async def events_until(messages: AsyncIterator[SseMessage], task_id: str) -> list[dict[str, Any]]:
    """Every event up to ``task_id``'s terminal one (events of any other task included, to be checked)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages:
            body = message.json()
            events.append(body)
            if body["task_id"] == task_id and body["event_type"] in TERMINAL:
                return events
    raise AssertionError(f"the stream ended after {len(events)} events")


async def status_of(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> int:
    """The status only; an event stream is closed at once (its status is all a 404 check needs)."""
    async with client.stream(method, url, timeout=httpx.Timeout(10.0), **kwargs) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            await response.aread()
        return response.status_code


def check_not_found(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == 404
    assert body["title"] == "Not Found"
    lowered = body["detail"].lower()
    assert not any(hint in lowered for hint in NOT_FOUND_HINTS), body["detail"]
    return body


def comparable(response: httpx.Response, the_id: str) -> tuple[int, str, str, frozenset[str]]:
    """The body with the id it names blanked, its length, and the names of the headers."""
    text = response.text.replace(the_id, "<id>")
    names = frozenset(response.headers.keys()) - {"date", "x-request-id"}
    return response.status_code, text, response.headers["content-length"], names


# Another subject's session answers exactly as an unknown one


PROBES = {
    # name -> (method, url template, JSON body template, reference route for an unknown id)
    "submit a task into it": ("POST", "/api/tasks", {"task": "$ cat notes.txt", "session_id": "{sid}"},
                              ("GET", "/api/sessions/{sid}")),
    "read it": ("GET", "/api/sessions/{sid}", None, ("GET", "/api/sessions/{sid}")),
    "read its events": ("GET", "/api/sessions/{sid}/events?after=0", None, ("GET", "/api/sessions/{sid}/events")),
    "stream it": ("GET", "/api/sse?session_id={sid}", None, ("GET", "/api/sessions/{sid}")),
    "delete it": ("DELETE", "/api/sessions/{sid}", None, ("DELETE", "/api/sessions/{sid}")),
    "read its task": ("GET", "/api/tasks/{tid}", None, ("GET", "/api/tasks/{tid}")),
    "cancel its task": ("POST", "/api/tasks/{tid}/cancel", None, ("POST", "/api/tasks/{tid}/cancel")),
}


def fill(template: str, sid: str, tid: str) -> str:
    return template.replace("{sid}", sid).replace("{tid}", tid)


@pytest.mark.parametrize("probe", list(PROBES))
async def test_another_subjects_session_is_indistinguishable_from_an_unknown_one(
        bob: httpx.AsyncClient, alices: Owned, probe: str) -> None:
    method, template, body, (ref_method, ref_template) = PROBES[probe]
    json_body = {k: fill(v, alices.session_id, alices.task_id) for k, v in body.items()} if body else None
    async with bob.stream(method, fill(template, alices.session_id, alices.task_id), json=json_body) as response:
        await response.aread()
    check_not_found(response)

    unknown_sid, unknown_tid = new_id(), new_task_id()
    reference = await bob.request(ref_method, fill(ref_template, unknown_sid, unknown_tid))
    check_not_found(reference)
    theirs = alices.task_id if "{tid}" in template else alices.session_id
    nobodys = unknown_tid if "{tid}" in ref_template else unknown_sid
    assert comparable(response, theirs) == comparable(reference, nobodys)
    assert alices.marker not in response.text


async def test_nothing_bob_tried_changed_alices_session(server: ServerProcess, alice: httpx.AsyncClient,
                                                        bob: httpx.AsyncClient, alices: Owned) -> None:
    for method, url in (("DELETE", f"/api/sessions/{alices.session_id}"),
                        ("POST", f"/api/tasks/{alices.task_id}/cancel")):
        check_not_found(await bob.request(method, url))
    view = await alice.get(f"/api/sessions/{alices.session_id}")
    assert view.status_code == 200
    assert alices.marker in json.dumps(view.json()["messages"])
    events = (await alice.get(f"/api/sessions/{alices.session_id}/events")).json()["events"]
    assert {e["task_id"] for e in events} == {alices.task_id}
    notes = server.data_dir / "workspaces" / alices.session_id / "notes.txt"
    assert notes.read_text().strip() == alices.marker
    assert alices.session_id not in (await bob.get("/api/sessions")).json()["sessions"]


async def test_bob_cannot_cancel_or_delete_alices_running_task(alice: httpx.AsyncClient,
                                                               bob: httpx.AsyncClient) -> None:
    session_id = new_id()
    task_id = await submit(alice, "$ sleep 20", session_id)
    try:
        deadline = time.monotonic() + 10
        while (await alice.get(f"/api/tasks/{task_id}")).json()["status"] != "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        check_not_found(await bob.post(f"/api/tasks/{task_id}/cancel"))
        check_not_found(await bob.delete(f"/api/sessions/{session_id}"))
        check_not_found(await bob.post("/api/tasks", json={"task": "$ echo bob", "session_id": session_id}))
        assert (await alice.get(f"/api/tasks/{task_id}")).json()["status"] == "running"
    finally:
        assert (await alice.post(f"/api/tasks/{task_id}/cancel")).status_code == 202


async def test_alices_events_never_reach_bobs_stream(alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    alice_session, bob_session = new_id(), new_id()
    marker = "alice-live-" + secrets.token_hex(6)
    async with open_stream(bob, bob_session) as bobs:
        async with open_stream(alice, alice_session) as alices_stream:
            alice_task = await submit(alice, f"$ echo {marker}", alice_session)
            seen_by_alice = await events_until(alices_stream, alice_task)
        assert marker in json.dumps(seen_by_alice)
        # Bob's own task comes after alice's whole task: if anything of hers had leaked to him, it is first.
        bob_task = await submit(bob, "$ echo bob-here", bob_session)
        seen_by_bob = await events_until(bobs, bob_task)
    assert {e["task_id"] for e in seen_by_bob} == {bob_task}
    assert {e["session_id"] for e in seen_by_bob} == {bob_session}
    assert marker not in json.dumps(seen_by_bob)


# Whoever uses an id first owns it, a stream included


async def test_a_stream_opened_early_claims_the_id_and_never_sees_the_other_subjects_task(
        alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    session_id = new_id("race")
    async with open_stream(bob, session_id) as bobs:
        # Bob subscribed to an id nobody had used: it is his now, and alice's task there is refused.
        check_not_found(await alice.post("/api/tasks", json={"task": "$ echo alice-in-race", "session_id": session_id}))
        assert await status_of(alice, "GET", "/api/sse", params={"session_id": session_id}) == 404
        check_not_found(await alice.get(f"/api/sessions/{session_id}"))
        bob_task = await submit(bob, "$ echo bob-in-race", session_id)
        seen = await events_until(bobs, bob_task)
    assert {e["task_id"] for e in seen} == {bob_task}
    assert "alice-in-race" not in json.dumps(seen)
    stored = (await bob.get(f"/api/sessions/{session_id}/events")).json()["events"]
    assert {e["task_id"] for e in stored} == {bob_task}
    assert session_id in (await bob.get("/api/sessions")).json()["sessions"]
    assert session_id not in (await alice.get("/api/sessions")).json()["sessions"]


async def test_once_alice_streams_an_id_bob_can_neither_stream_it_nor_run_a_task_there(
        alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    session_id = new_id("race")
    async with open_stream(alice, session_id) as alices_stream:
        assert await status_of(bob, "GET", "/api/sse", params={"session_id": session_id}) == 404
        check_not_found(await bob.post("/api/tasks", json={"task": "$ echo bob-in-race", "session_id": session_id}))
        alice_task = await submit(alice, "$ echo alice-owns-it", session_id)
        seen = await events_until(alices_stream, alice_task)
    assert {e["task_id"] for e in seen} == {alice_task}
    assert seen[-1]["event_type"] == "task_complete"


async def test_an_id_deleted_by_its_owner_and_taken_by_another_subject_starts_empty(
        server: ServerProcess, alice: httpx.AsyncClient, bob: httpx.AsyncClient) -> None:
    session_id = new_id("reuse")
    marker = "alice-left-" + secrets.token_hex(6)
    alice_task = await submit(alice, f"$ echo {marker} > left-behind.txt; echo {marker}", session_id)
    deadline = time.monotonic() + 30
    while (await alice.get(f"/api/tasks/{alice_task}")).json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert (await alice.delete(f"/api/sessions/{session_id}")).status_code == 204

    bob_task = await submit(bob, "$ ls -A; cat left-behind.txt", session_id)
    deadline = time.monotonic() + 30
    while (view := (await bob.get(f"/api/tasks/{bob_task}")).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert marker not in (view["final_answer"] or "")
    assert "No such file" in (view["final_answer"] or "")
    events = (await bob.get(f"/api/sessions/{session_id}/events")).json()["events"]
    assert {e["task_id"] for e in events} == {bob_task}
    assert marker not in json.dumps(events)
    session = (await bob.get(f"/api/sessions/{session_id}")).json()
    assert marker not in json.dumps(session)
    check_not_found(await bob.get(f"/api/tasks/{alice_task}"))
    check_not_found(await alice.get(f"/api/sessions/{session_id}"))
    assert not (server.data_dir / "workspaces" / session_id / "left-behind.txt").exists()


async def test_an_admin_lists_every_session_and_reads_alices(server: ServerProcess, alices: Owned,
                                                            bob: httpx.AsyncClient) -> None:
    bob_session = new_id()
    bob_task = await submit(bob, "$ echo bob-for-admin", bob_session)
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("operator", ("admin",)),
                                 timeout=10) as admin:
        listed = (await admin.get("/api/sessions")).json()["sessions"]
        assert {alices.session_id, bob_session} <= set(listed)
        view = await admin.get(f"/api/sessions/{alices.session_id}")
        assert view.status_code == 200
        assert alices.marker in json.dumps(view.json()["messages"])
        task = await admin.get(f"/api/tasks/{bob_task}")
        assert task.status_code == 200
        assert task.json()["session_id"] == bob_session
    # Bob, no admin, still sees only his own.
    own = (await bob.get("/api/sessions")).json()["sessions"]
    assert bob_session in own
    assert alices.session_id not in own


# Invalid session ids


BAD_IDS = ["..", ".", "a/b", "../../etc", "x" * 129, "%00", "\x00", "a\\b", " ", "", "é", "a b", "~root", "a\nb"]


def in_path(session_id: str) -> str:
    # Dots encoded too, so that no client normalizes ``..`` away before the server sees it.
    return quote(session_id, safe="").replace(".", "%2E")


@pytest.mark.parametrize("session_id", BAD_IDS, ids=[repr(i) for i in BAD_IDS])
async def test_an_invalid_session_id_is_refused_with_404_or_422_never_500(server: ServerProcess,
                                                                          alice: httpx.AsyncClient,
                                                                          session_id: str) -> None:
    answers = {
        "submit": (await alice.post("/api/tasks", json={"task": "$ echo escaped > ../../escaped.txt",
                                                        "session_id": session_id})).status_code,
        "stream": await status_of(alice, "GET", "/api/sse", params={"session_id": session_id}),
    }
    if session_id:
        for name, (method, url) in {
            "read": ("GET", f"/api/sessions/{in_path(session_id)}"),
            "events": ("GET", f"/api/sessions/{in_path(session_id)}/events"),
            "delete": ("DELETE", f"/api/sessions/{in_path(session_id)}"),
        }.items():
            answers[name] = await status_of(alice, method, url)
    assert all(status in (404, 422) for status in answers.values()), answers
    assert not server.events_logged("request_failed")


async def test_the_longest_and_the_oddest_valid_ids_stay_inside_the_workspaces(server: ServerProcess,
                                                                              alice: httpx.AsyncClient) -> None:
    for session_id in ("y" * 128, "...", "-", "_.-"):
        task_id = await submit(alice, "$ pwd; echo inside > proof.txt", session_id)
        deadline = time.monotonic() + 30
        while (view := (await alice.get(f"/api/tasks/{task_id}")).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert view["status"] == "completed", view
        workspace = server.data_dir / "workspaces" / session_id
        assert (workspace / "proof.txt").read_text().strip() == "inside"
        assert workspace.resolve().parent == (server.data_dir / "workspaces").resolve()


def test_no_session_id_made_anything_outside_the_workspaces(server: ServerProcess) -> None:
    """Runs after the id tests above (file order): nothing was made beside the data folder's own files."""
    data = server.data_dir
    assert {p.name for p in data.parent.iterdir()} == {"data"}
    assert {p.name for p in data.iterdir()} <= {"alex.db", "alex.db-wal", "alex.db-shm", "alex.db-journal",
                                                "workspaces"}
    workspaces = data / "workspaces"
    for entry in workspaces.iterdir():
        assert entry.is_dir(), entry
        assert not entry.is_symlink(), entry
        assert entry.resolve().parent == workspaces.resolve(), entry
        assert entry.name not in (".", "..", "a", "etc", "x" * 129)
    assert not any(p.name == "escaped.txt" for p in data.parent.rglob("*"))
    assert not Path("/etc/escaped.txt").exists()
