"""Calls the web UI's integration tests make again and again: a client that behaves like the UI's pages, and a
reader of SSE frames (HTML ones included)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

import httpx

from tests.integration.calls import STREAM_TIMEOUT, TERMINAL
from tests.integration.server import ServerProcess, auth, token

PROBLEM = "application/problem+json"


def origin(server: ServerProcess) -> dict[str, str]:
    return {"Origin": server.base_url}


def browser(server: ServerProcess, subject: str = "alice") -> httpx.Client:
    """A client that behaves like the UI's pages: the token in the cookie, its own Origin on every request."""
    return httpx.Client(base_url=server.base_url, timeout=STREAM_TIMEOUT, headers=origin(server),
                        cookies={"alex_token": token(subject)})


def api(server: ServerProcess, subject: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=STREAM_TIMEOUT, headers=auth(subject))


def set_cookie(response: httpx.Response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


def assert_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    assert response.json()["status"] == status


def new_session(client: httpx.Client) -> str:
    response = client.post("/ui/sessions", headers={"HX-Request": "true"})
    assert response.status_code == 201, response.text
    pushed = response.headers["HX-Push-Url"]
    match = re.fullmatch(r"/\?session_id=(s_[0-9a-f]{16})", pushed)
    assert match, pushed
    return match.group(1)


@dataclass
class Frame:
    event: str
    data: str
    id: str | None


def parse_frames(lines: Iterable[str]) -> Iterator[Frame]:
    """The frames of a stream's lines, ``connected`` and notices included; comments (heartbeats) left out."""
    fields: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(":")
            fields.setdefault(name, []).append(value.removeprefix(" "))
            continue
        if fields:
            yield Frame(fields.get("event", ["message"])[0], "\n".join(fields.get("data", [])),
                        fields.get("id", [None])[0])
            fields = {}


def read_frames(lines: Iterable[str], until: Any) -> list[Frame]:
    """The frames up to the first for which ``until(frame)`` holds."""
    frames: list[Frame] = []
    for frame in parse_frames(lines):
        frames.append(frame)
        if until(frame):
            return frames
    raise AssertionError(f"the stream ended after {[(f.event, f.id) for f in frames]}")


def run_to_end(client: httpx.Client, session_id: str, task: str) -> str:
    response = client.post("/api/tasks", json={"task": task, "session_id": session_id})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    deadline = time.monotonic() + STREAM_TIMEOUT
    while client.get(f"/api/tasks/{task_id}").json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the task never finished"
        time.sleep(0.02)
    return task_id


def stream(client: httpx.Client, path: str, session_id: str, until: Any, *,
           headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> list[Frame]:
    with client.stream("GET", path, params={"session_id": session_id, **(params or {})},
                       headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        return read_frames(response.iter_lines(), until)


def terminal(frame: Frame) -> bool:
    return frame.event in TERMINAL


def terminals(count: int) -> Any:
    """A stop condition: the ``count``-th frame that ends a task."""
    seen = 0

    def enough(frame: Frame) -> bool:
        nonlocal seen
        seen += frame.event in TERMINAL
        return seen == count

    return enough
