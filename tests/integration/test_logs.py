"""The server's log lines, read from its stderr: one JSON object a line (uvicorn's too), each request's and task's
ids on the lines they wrote, no credential on any line, and readable lines with the same ids for a terminal."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from service.tokens import mint_token
from tests.integration.calls import STREAM_TIMEOUT, count_until_terminal, open_stream, wait_finished
from tests.integration.server import ALL_SCOPES, SECRET, ServerProcess, auth, data_folder, running, token

pytestmark = pytest.mark.integration

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
MODEL_KEY = "sk-test-" + secrets.token_hex(20)
"""An OpenAI key the server is given (and, with ``ALEX_LLM_PROVIDER=mock``, never uses): it must not be logged."""


async def logged(server: ServerProcess, match: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The first line ``match`` takes, waiting for it (the server writes some lines after the client is done)."""
    deadline = time.monotonic() + STREAM_TIMEOUT
    while time.monotonic() < deadline:
        for record in list(server.logs):
            if match(record):
                return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {what} line in:\n" + "\n".join(server.raw_logs[-30:]))


@pytest.fixture(scope="module")
def json_server() -> Iterator[ServerProcess]:
    """JSON lines (the harness's default), with a model key it must keep out of them; at debug level, so that the
    libraries' chattiest lines are searched for credentials too."""
    with running(OPENAI_API_KEY=MODEL_KEY, ALEX_LLM_PROVIDER="mock", ALEX_LOG_LEVEL="debug") as process:
        yield process


@dataclass(frozen=True)
class Submitted:
    """A task submitted with a request id and a traceparent, followed on a stream until it ended."""

    request_id: str
    trace_id: str
    caller_span_id: str
    session_id: str
    task: dict[str, Any]
    received: int
    """Session events the stream delivered."""


async def submit_followed(server: ServerProcess) -> Submitted:
    request_id = "req-" + secrets.token_hex(6)
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    session_id = "logged-task"
    headers = {"X-Request-ID": request_id, "traceparent": f"00-{trace_id}-{span_id}-01"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client:
        async with open_stream(client, session_id) as messages:
            response = await client.post("/api/tasks", json={"task": "look around", "session_id": session_id},
                                         headers=headers)
            assert response.status_code == 202, response.text
            assert response.headers["x-request-id"] == request_id
            received = await count_until_terminal(messages)
        task = await wait_finished(client, response.json()["task_id"])
    return Submitted(request_id, trace_id, span_id, session_id, task, received)


@pytest.fixture(scope="module")
def submitted(json_server: ServerProcess) -> Submitted:
    return asyncio.run(submit_followed(json_server))


# Ids on the lines


async def test_the_request_line_carries_the_request_subject_trace_session_and_task(
        json_server: ServerProcess, submitted: Submitted) -> None:
    line = await logged(json_server, lambda r: r.get("event") == "http_request"
                        and r.get("request_id") == submitted.request_id, "http_request")
    assert (line["method"], line["route"], line["status"]) == ("POST", "/api/tasks", 202)
    assert line["subject"] == "alice"
    assert line["trace_id"] == submitted.trace_id
    assert HEX16.match(line["span_id"]), line
    assert line["span_id"] != submitted.caller_span_id, "the request's own span, a child of the caller's"
    assert (line["session_id"], line["task_id"]) == (submitted.session_id, submitted.task["task_id"])


async def test_a_request_without_an_id_gets_one_on_its_line_and_its_answer(json_server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=json_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        response = await client.get("/api/sessions")
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert HEX16.match(request_id), request_id
    line = await logged(json_server, lambda r: r.get("request_id") == request_id, "http_request")
    assert (line["event"], line["route"], line["subject"]) == ("http_request", "/api/sessions", "alice")


async def test_the_task_finished_line_carries_the_task_its_trace_and_its_outcome(
        json_server: ServerProcess, submitted: Submitted) -> None:
    task = submitted.task
    line = await logged(json_server, lambda r: r.get("event") == "task_finished"
                        and r.get("task_id") == task["task_id"], "task_finished")
    assert line["session_id"] == submitted.session_id
    assert line["trace_id"] == task["trace_id"] == submitted.trace_id
    assert (line["status"], line["iterations"]) == (task["status"], task["iterations"])
    assert line["status"] == "completed"
    assert isinstance(line["seconds"], int | float)
    assert line["seconds"] >= 0
    assert line["request_id"] == submitted.request_id, "a task's lines carry the request that submitted it"


async def test_the_stream_closed_line_sums_up_the_stream(json_server: ServerProcess, submitted: Submitted) -> None:
    line = await logged(json_server, lambda r: r.get("event") == "sse_stream_closed"
                        and r.get("session_id") == submitted.session_id, "sse_stream_closed")
    assert line["reason"] == "client_gone"
    assert line["replayed"] + line["delivered"] == submitted.received
    assert line["dropped"] == 0


# Credentials


@pytest.mark.parametrize("channel", ["header", "cookie", "query"])
async def test_no_token_reaches_a_line_whichever_way_it_came(json_server: ServerProcess, channel: str) -> None:
    subject = f"carrier-{channel}"
    accepted = token(subject)
    refused = mint_token(SECRET, subject, ALL_SCOPES, -100)
    session_id = f"logged-{channel}"
    stream_id, refused_id = f"req-stream-{channel}", f"req-refused-{channel}"

    def carrying(jwt: str, request_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """Headers and query parameters that carry ``jwt`` by this channel."""
        headers = {"X-Request-ID": request_id}
        if channel == "header":
            return {**headers, "Authorization": f"Bearer {jwt}"}, {}
        if channel == "cookie":
            return {**headers, "Cookie": f"alex_token={jwt}"}, {}
        return headers, {"access_token": jwt}

    async with httpx.AsyncClient(base_url=json_server.base_url, timeout=10.0) as client:
        headers, params = carrying(accepted, stream_id)
        async with open_stream(client, session_id, headers=headers, params=params):
            pass
        headers, params = carrying(refused, refused_id)
        expired = await client.get("/api/sessions", headers=headers, params=params)
    assert expired.status_code == 401, expired.text

    stream_line = await logged(json_server, lambda r: r.get("event") == "http_request"
                               and r.get("request_id") == stream_id, "the stream's http_request")
    refused_line = await logged(json_server, lambda r: r.get("event") == "http_request"
                                and r.get("request_id") == refused_id, "the refused request's http_request")
    assert (stream_line["route"], stream_line["status"], stream_line["subject"]) == ("/api/sse", 200, subject)
    assert (refused_line["status"], refused_line["subject"]) == (401, None)
    if channel == "query":
        for line in (stream_line, refused_line):
            assert parse_qs(line["query"])["access_token"] == ["[redacted]"], line
        assert parse_qs(stream_line["query"])["session_id"] == [session_id]
    for jwt in (accepted, refused):
        signature = jwt.rsplit(".", 1)[1]
        assert [line for line in json_server.raw_logs if jwt in line or signature in line] == []


async def test_the_model_key_reaches_no_line(json_server: ServerProcess, submitted: Submitted) -> None:
    ready = await logged(json_server, lambda r: r.get("event") == "server_ready", "server_ready")
    assert ready["provider"] == "mock"
    assert submitted.task["status"] == "completed"
    assert [line for line in json_server.raw_logs if MODEL_KEY in line] == []


# The format


async def test_every_line_is_one_json_object_uvicorns_too(json_server: ServerProcess, submitted: Submitted) -> None:
    await logged(json_server, lambda r: r.get("event") == "task_finished", "task_finished")
    records = []
    for line in json_server.raw_logs:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    assert all({"event", "level", "logger", "timestamp"} <= set(record) for record in records)
    assert [r for r in records if r["logger"].startswith("uvicorn")], "uvicorn's own lines go through the pipeline"
    assert {r["level"] for r in records} <= {"debug", "info", "warning", "error", "critical"}


class ConsoleServer(ServerProcess):
    """A server logging for a terminal (``ALEX_LOG_FORMAT=console``): its port comes from the ``port=`` of its
    ``server_listening`` line instead of a JSON field."""

    LISTENING = re.compile(r"\bserver_listening\b.*\bport=(?P<port>\d+)")

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.rstrip("\n")
            self.raw_logs.append(line)
            found = self.LISTENING.search(line)
            if found:
                self.port = int(found["port"])
                self._listening.set()
        process.stderr.close()


async def line_with(server: ServerProcess, text: str) -> str:
    deadline = time.monotonic() + STREAM_TIMEOUT
    while time.monotonic() < deadline:
        for line in list(server.raw_logs):
            if text in line:
                return line
        await asyncio.sleep(0.02)
    raise AssertionError(f"no line with {text!r} in:\n" + "\n".join(server.raw_logs[-30:]))


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


async def test_console_lines_are_readable_and_carry_the_same_ids() -> None:
    with data_folder() as folder:
        server = ConsoleServer(folder, env={"ALEX_LOG_FORMAT": "console"}).start()
        try:
            submitted = await submit_followed(server)
            await line_with(server, " task_finished ")
        finally:
            server.kill()

    lines = server.raw_logs
    assert [line for line in lines if is_json_object(line)] == []
    assert [line for line in lines if "[uvicorn" in line], "uvicorn's lines are in the same format"
    request = [fields(line) for line in lines if " http_request " in line
               and f"request_id={submitted.request_id}" in line]
    assert len(request) == 1, lines
    assert (request[0]["trace_id"], request[0]["subject"]) == (submitted.trace_id, "alice")
    assert (request[0]["session_id"], request[0]["task_id"]) == (submitted.session_id, submitted.task["task_id"])
    finished = [fields(line) for line in lines if " task_finished " in line]
    assert len(finished) == 1, lines
    assert finished[0]["task_id"] == submitted.task["task_id"]
    assert finished[0]["trace_id"] == submitted.trace_id
    assert finished[0]["status"] == "completed"
