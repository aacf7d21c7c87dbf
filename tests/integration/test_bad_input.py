"""Bad input over real HTTP: every refusal is problem+json with the right status, never a 500, never a logged crash."""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service.tokens import mint_token
from tests.integration.server import ServerProcess, auth, data_folder, token

pytestmark = pytest.mark.integration

MAX_TASK_CHARS = 100
MAX_BODY_BYTES = 2048
TLS = ssl.create_default_context()
"""One trust store for every client (nothing here is TLS, but each new client would load its own: ~25 ms)."""


@dataclass
class World:
    server: ServerProcess
    alice_session: str = "alice-owned"
    alice_task: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """One server (small task and body limits) where alice has a session with a finished task."""
    env = {"ALEX_MAX_TASK_CHARS": str(MAX_TASK_CHARS), "ALEX_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    with data_folder() as data:
        server = ServerProcess(data, env=env).start()
        try:
            with httpx.Client(verify=TLS, base_url=server.base_url, headers=auth("alice"), timeout=10.0) as alice:
                response = alice.post("/api/tasks", json={"task": "$ echo mine", "session_id": "alice-owned"})
                assert response.status_code == 202, response.text
                task_id = response.json()["task_id"]
                deadline = time.monotonic() + 20
                while alice.get(f"/api/tasks/{task_id}").json()["status"] in ("queued", "running"):
                    assert time.monotonic() < deadline, "alice's task never finished"
                    time.sleep(0.02)
            yield World(server, alice_task=task_id)
        finally:
            server.kill()


@pytest.fixture
async def alice(world: World) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=TLS, base_url=world.server.base_url, headers=auth("alice"),
                                 timeout=10.0) as client:
        yield client
    await no_crash_logged(world.server)


async def no_crash_logged(server: ServerProcess) -> None:
    """Every log line written so far is read (a marked request's line has come), and none is a crash or a 500."""
    marker = secrets.token_hex(8)
    async with httpx.AsyncClient(verify=TLS, base_url=server.base_url, timeout=10.0) as client:
        await client.get("/health", headers={"X-Request-ID": marker})
    deadline = time.monotonic() + 5
    while not any(r.get("request_id") == marker and r.get("event") == "http_request" for r in list(server.logs)):
        assert time.monotonic() < deadline, "the marked request was never logged"
        await asyncio.sleep(0.005)
    logs = list(server.logs)
    assert not [r for r in logs if r.get("event") == "request_failed"]
    assert not [r for r in logs if r.get("event") == "http_request" and r.get("status", 0) >= 500]


def check_problem(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].split(";")[0] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= set(body), body
    assert body["status"] == response.status_code
    assert isinstance(body["type"], str)
    assert body["type"]
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


# The task body


@pytest.mark.parametrize(
    ("body", "where"),
    [
        pytest.param({}, "task", id="missing-task"),
        pytest.param({"task": 123}, "task", id="task-is-a-number"),
        pytest.param({"task": None}, "task", id="task-is-null"),
        pytest.param({"task": ["ls"]}, "task", id="task-is-a-list"),
        pytest.param({"task": "ls", "priority": 1}, "priority", id="unknown-field"),
        pytest.param({"task": ""}, "task", id="empty-task"),
        pytest.param({"task": "ls", "session_id": 5}, "session_id", id="session-id-is-a-number"),
        pytest.param([{"task": "ls"}], "body", id="body-is-a-list"),
    ],
)
async def test_an_invalid_task_body_is_422_with_errors(alice: httpx.AsyncClient, body: Any, where: str) -> None:
    problem = check_problem(await alice.post("/api/tasks", json=body), 422)
    assert isinstance(problem.get("errors"), list)
    assert problem["errors"], problem
    assert any(where in str(error.get("loc", "")) for error in problem["errors"]), problem["errors"]


@pytest.mark.parametrize("task", [" \n\t ", "x" * (MAX_TASK_CHARS + 1)], ids=["blank", "too-long"])
async def test_a_blank_or_too_long_task_is_422(alice: httpx.AsyncClient, task: str) -> None:
    check_problem(await alice.post("/api/tasks", json={"task": task}), 422)


async def test_a_task_of_exactly_the_limit_is_accepted(alice: httpx.AsyncClient) -> None:
    response = await alice.post("/api/tasks", json={"task": "$ echo " + "y" * (MAX_TASK_CHARS - 7)})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "content",
    [b'{"task": ', b"{task: 'ls'}", b"\xff\xfe\x00garbage", b""],
    ids=["truncated", "not-json", "not-utf8", "empty"],
)
async def test_a_body_that_is_not_json_is_400(alice: httpx.AsyncClient, content: bytes) -> None:
    response = await alice.post("/api/tasks", content=content, headers={"Content-Type": "application/json"})
    check_problem(response, 400, 422)
    if content != b"":
        assert response.status_code == 400


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
    ids=["text", "form", "multipart", "none"],
)
async def test_a_body_that_is_not_declared_json_is_415(alice: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await alice.post("/api/tasks", content=b'{"task": "ls"}', headers=headers)
    check_problem(response, 415)


async def test_a_body_over_the_limit_is_413(alice: httpx.AsyncClient) -> None:
    big = {"task": "x" * (MAX_BODY_BYTES + 100)}
    response = await alice.post("/api/tasks", json=big)
    check_problem(response, 413)


async def test_a_chunked_body_over_the_limit_is_413(alice: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"task": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}'

    response = await alice.post("/api/tasks", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    check_problem(response, 413)


async def test_a_small_chunked_body_is_accepted(alice: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"task": "$ echo '
        yield b'chunked"}'

    response = await alice.post("/api/tasks", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 202, response.text


# Ids


BAD_SESSION_IDS = ["../etc", "a b", "x" * 200, "..", "a/b", "%00", "ä"]


@pytest.mark.parametrize("session_id", BAD_SESSION_IDS)
async def test_a_bad_session_id_in_the_body_is_refused(alice: httpx.AsyncClient, session_id: str) -> None:
    response = await alice.post("/api/tasks", json={"task": "$ echo x", "session_id": session_id})
    check_problem(response, 422, 404)


@pytest.mark.parametrize("session_id", BAD_SESSION_IDS)
async def test_a_bad_session_id_in_the_stream_query_is_refused(alice: httpx.AsyncClient, session_id: str) -> None:
    response = await alice.get("/api/sse", params={"session_id": session_id})
    check_problem(response, 422, 404)


@pytest.mark.parametrize("raw", ["..%2Fetc", "a%20b", "x" * 200, "%2E%2E", "..", "%00", "%C3%A4"])
@pytest.mark.parametrize("suffix", ["", "/events"])
async def test_a_bad_session_id_in_the_path_is_404(alice: httpx.AsyncClient, raw: str, suffix: str) -> None:
    check_problem(await alice.get(f"/api/sessions/{raw}{suffix}"), 404)
    if not suffix:
        check_problem(await alice.delete(f"/api/sessions/{raw}"), 404, 405)


async def test_a_stream_without_a_session_id_is_422(alice: httpx.AsyncClient) -> None:
    problem = check_problem(await alice.get("/api/sse"), 422)
    assert any("session_id" in str(e.get("loc")) for e in problem["errors"])


@pytest.mark.parametrize(
    "params",
    [{"after": "-1"}, {"after": "abc"}, {"limit": "0"}, {"limit": "100000"}, {"limit": "ten"}],
    ids=["negative-after", "text-after", "zero-limit", "huge-limit", "text-limit"],
)
async def test_bad_event_paging_is_422(alice: httpx.AsyncClient, params: dict[str, str]) -> None:
    check_problem(await alice.get("/api/sessions/alice-owned/events", params=params), 422)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/tasks/t_0000000000000000"),
        ("GET", "/api/tasks/not-a-task-id"),
        ("POST", "/api/tasks/t_0000000000000000/cancel"),
        ("GET", "/api/sessions/no-such-session"),
        ("GET", "/api/sessions/no-such-session/events"),
        ("DELETE", "/api/sessions/no-such-session"),
        ("GET", "/api/nothing-here"),
        ("GET", "/nothing-here"),
        ("POST", "/api/tasks/t_0000000000000000/resume"),
    ],
)
async def test_unknown_ids_and_routes_are_404(alice: httpx.AsyncClient, method: str, path: str) -> None:
    check_problem(await alice.request(method, path), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/api/tasks"), ("GET", "/api/tasks"), ("DELETE", "/api/tasks/t_0000000000000000"),
     ("PATCH", "/api/sessions"), ("POST", "/api/sessions/alice-owned"), ("POST", "/health")],
)
async def test_a_wrong_method_is_405(alice: httpx.AsyncClient, method: str, path: str) -> None:
    response = await alice.request(method, path)
    check_problem(response, 405)
    assert response.headers.get("allow"), "a 405 names the methods allowed"


# Authentication and authorization


PROTECTED = [
    ("GET", "/api/sessions", None),
    ("GET", "/api/sessions/alice-owned", None),
    ("GET", "/api/sessions/alice-owned/events", None),
    ("DELETE", "/api/sessions/alice-owned", None),
    ("POST", "/api/tasks", {"task": "$ echo x"}),
    ("GET", "/api/tasks/t_0000000000000000", None),
    ("POST", "/api/tasks/t_0000000000000000/cancel", None),
    ("GET", "/api/sse?session_id=alice-owned", None),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
async def test_no_token_is_401_with_www_authenticate(world: World, method: str, path: str, body: Any) -> None:
    async with httpx.AsyncClient(verify=TLS, base_url=world.server.base_url, timeout=10.0) as anonymous:
        response = await anonymous.request(method, path, json=body)
    check_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    await no_crash_logged(world.server)


@pytest.mark.parametrize(
    "bearer",
    [
        pytest.param("not-a-jwt", id="garbage"),
        pytest.param(token("alice", ttl=-3600), id="expired"),
        pytest.param(mint_token("some-other-secret-0123456789abcdef", "alice",
                                ("tasks:write", "sessions:read", "sessions:write"), 3600), id="wrong-key"),
        pytest.param(token("alice")[:-4] + "AAAA", id="bad-signature"),
        pytest.param("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.", id="alg-none"),
    ],
)
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED[:5])
async def test_an_invalid_token_is_401_invalid_token(world: World, bearer: str, method: str, path: str,
                                                     body: Any) -> None:
    async with httpx.AsyncClient(verify=TLS, base_url=world.server.base_url, timeout=10.0,
                                 headers={"Authorization": f"Bearer {bearer}"}) as client:
        response = await client.request(method, path, json=body)
    check_problem(response, 401)
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    assert 'error="invalid_token"' in challenge
    await no_crash_logged(world.server)


async def test_a_malformed_authorization_header_is_401(world: World) -> None:
    async with httpx.AsyncClient(verify=TLS, base_url=world.server.base_url, timeout=10.0) as client:
        for header in ("Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer \t x", token("alice")):
            response = await client.get("/api/sessions", headers={"Authorization": header})
            check_problem(response, 401)
            assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("scopes", "method", "path", "body"),
    [
        (("sessions:read", "sessions:write"), "POST", "/api/tasks", {"task": "$ echo x"}),
        (("sessions:read", "sessions:write"), "POST", "/api/tasks/t_0000000000000000/cancel", None),
        (("tasks:write",), "GET", "/api/sessions", None),
        (("tasks:write",), "GET", "/api/sessions/alice-owned", None),
        (("tasks:write",), "GET", "/api/tasks/t_0000000000000000", None),
        (("tasks:write",), "GET", "/api/sse?session_id=alice-owned", None),
        (("tasks:write", "sessions:read"), "DELETE", "/api/sessions/alice-owned", None),
        ((), "GET", "/api/sessions", None),
    ],
)
async def test_a_token_without_the_scope_is_403(world: World, scopes: tuple[str, ...], method: str, path: str,
                                                body: Any) -> None:
    async with httpx.AsyncClient(verify=TLS, base_url=world.server.base_url, timeout=10.0,
                                 headers=auth("alice", scopes)) as client:
        response = await client.request(method, path, json=body)
    check_problem(response, 403)
    await no_crash_logged(world.server)


async def test_bob_cannot_touch_alices_task_or_session(world: World, alice: httpx.AsyncClient) -> None:
    task_path = f"/api/tasks/{world.alice_task}"
    async with httpx.AsyncClient(verify=TLS, base_url=world.server.base_url, headers=auth("bob"), timeout=10.0) as bob:
        for method, path, body in [
            ("GET", task_path, None),
            ("POST", f"{task_path}/cancel", None),
            ("GET", "/api/sessions/alice-owned", None),
            ("GET", "/api/sessions/alice-owned/events", None),
            ("DELETE", "/api/sessions/alice-owned", None),
            ("POST", "/api/tasks", {"task": "$ echo intruder", "session_id": "alice-owned"}),
            ("GET", "/api/sse?session_id=alice-owned", None),
        ]:
            response = await bob.request(method, path, json=body)
            problem = check_problem(response, 404)
            # Word for word what a missing one answers: nothing tells bob that it exists.
            missing_path = path.replace(world.alice_task, "t_0000000000000000").replace("alice-owned", "never-was")
            if ("sse" not in path and "POST" not in method) or "cancel" in path:
                missing = check_problem(await bob.request(method, missing_path, json=body), 404)
                assert problem["detail"] == missing["detail"].replace("t_0000000000000000", world.alice_task).replace(
                    "never-was", "alice-owned")
        assert "alice-owned" not in (await bob.get("/api/sessions")).json()["sessions"]
    # Nothing of alice's changed.
    assert (await alice.get(task_path)).json()["status"] == "completed"
    session = (await alice.get("/api/sessions/alice-owned")).json()
    assert not any("intruder" in str(m.get("content")) for m in session["messages"])
    assert "alice-owned" in (await alice.get("/api/sessions")).json()["sessions"]
