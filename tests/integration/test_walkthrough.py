"""The seed's curl walk-through, step by step, against the real server over real sockets; the README's own curl
commands run verbatim; and ``alex-server run`` against a live server."""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.calls import STREAM_TIMEOUT, wait_finished
from tests.integration.server import SECRET, ServerProcess, auth, clean_environment, data_folder, free_port, running

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
ALEX_SERVER = Path(sys.executable).with_name("alex-server")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
ENVELOPE = ("event_type", "id", "session_id", "task_id", "timestamp", "trace_id")
WITH_ITERATION = frozenset({"iteration_start", "thinking", "think_complete", "tool_call_start", "tool_call_stream",
                            "tool_call_complete", "iteration_complete", "task_complete"})




@dataclass
class Frame:
    event: str
    data: str
    id: str | None


class RawStream:
    """An SSE body read line by line: frames as they come, and the comment lines (heartbeats) seen meanwhile.

    Its own parser rather than ``service.client.parse_sse``: this test judges the wire format itself, heartbeats
    interleaved with frames included, so it does not lean on the client code it would be checking."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self.comments: list[str] = []
        self._items = self._parse(lines)

    @staticmethod
    async def _parse(lines: AsyncIterator[str]) -> AsyncGenerator[Frame | str, None]:
        event, frame_id = "", None
        data: list[str] = []
        async for line in lines:
            if line == "":
                if data or event:
                    yield Frame(event or "message", "\n".join(data), frame_id)
                event, data, frame_id = "", [], None
            elif line.startswith(":"):
                yield line
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    frame_id = value

    async def aclose(self) -> None:
        await self._items.aclose()

    async def next_frame(self) -> Frame:
        async for item in self._items:
            if isinstance(item, Frame):
                return item
            self.comments.append(item)
        raise EOFError("the stream ended")

    async def until_terminal(self, task_id: str) -> list[dict[str, Any]]:
        """The events of ``task_id`` up to and including its terminal one; asserts no foreign event comes."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(STREAM_TIMEOUT):
            while True:
                frame = await self.next_frame()
                body = json.loads(frame.data)
                assert body["task_id"] == task_id, body
                assert frame.event == body["event_type"]
                assert frame.id == body["id"], "the SSE id line and the payload's id differ"
                seen.append(body)
                if frame.event in ("task_complete", "task_cancelled", "error"):
                    return seen

    async def until_pings(self, count: int) -> None:
        """Read until ``count`` heartbeats have come since the last event; no event may come meanwhile."""
        pings = 0
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for item in self._items:
                assert isinstance(item, str), f"an event came while only heartbeats were due: {item}"
                self.comments.append(item)
                assert item == ": ping", item
                pings += 1
                if pings == count:
                    return
        raise EOFError("the stream ended")


def collapse(types: list[str]) -> list[str]:
    """Consecutive repeats (thinking deltas, output lines) as one."""
    out: list[str] = []
    for kind in types:
        if not out or out[-1] != kind:
            out.append(kind)
    return out


def check_envelopes(events: list[dict[str, Any]], session_id: str, task_id: str) -> None:
    assert events, "no events"
    trace_ids = {e["trace_id"] for e in events}
    assert len(trace_ids) == 1, f"one trace per task, got {trace_ids}"
    assert TRACE_ID.match(trace_ids.pop())
    stamps = []
    for event in events:
        for key in ENVELOPE:
            assert key in event, f"{event['event_type']} lacks {key}: {event}"
        assert event["session_id"] == session_id
        assert event["task_id"] == task_id
        assert TIMESTAMP.match(event["timestamp"]), event["timestamp"]
        stamps.append(event["timestamp"])
        if event["event_type"] in WITH_ITERATION:
            assert isinstance(event["iteration"], int), event
            assert event["iteration"] >= 1
    assert stamps == sorted(stamps), "timestamps go back in time"


def check_ids_increase(events: list[dict[str, Any]]) -> None:
    ids = [int(e["id"]) for e in events]
    assert all(b > a for a, b in itertools.pairwise(ids)), f"ids not strictly increasing: {ids}"


def check_thinking_matches(events: list[dict[str, Any]]) -> None:
    """Per iteration, the thinking deltas join to the think_complete content."""
    deltas: dict[int, list[str]] = {}
    for event in events:
        if event["event_type"] == "thinking":
            deltas.setdefault(event["iteration"], []).append(event["delta"])
        elif event["event_type"] == "think_complete":
            assert "".join(deltas.get(event["iteration"], [])) == event["content"]


async def submit(client: httpx.AsyncClient, task: str, session_id: str) -> str:
    response = await client.post("/api/tasks", json={"task": task, "session_id": session_id})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "accepted"
    assert accepted["session_id"] == session_id
    task_id: str = accepted["task_id"]
    assert re.match(r"^t_[0-9a-f]+$", task_id)
    assert "SSE" in accepted["message"]
    assert response.headers["location"] == f"/api/tasks/{task_id}"
    return task_id


def check_listing_task(events: list[dict[str, Any]], task_id: str) -> None:
    """The mock's two-iteration run of a listing task, in order, each event with its envelope."""
    assert collapse([e["event_type"] for e in events]) == [
        "task_analysis", "iteration_start", "thinking", "think_complete", "tool_call_start",
        "tool_call_complete", "iteration_complete", "iteration_start", "thinking", "think_complete",
        "iteration_complete", "task_complete",
    ]
    check_envelopes(events, "test-session", task_id)
    check_ids_increase(events)
    check_thinking_matches(events)
    analysis = events[0]
    assert "iteration" not in analysis, "task_analysis comes before any iteration"
    assert analysis["goal"] == "List all files in the current directory"
    assert analysis["action_name"]
    start = next(e for e in events if e["event_type"] == "tool_call_start")
    complete = next(e for e in events if e["event_type"] == "tool_call_complete")
    assert (start["tool_name"], complete["tool_name"]) == ("list_files", "list_files")
    assert start["call_id"] == complete["call_id"]
    assert complete["error"] is None
    assert isinstance(complete["duration"], int)
    assert complete["duration"] >= 0
    done = events[-1]
    assert done["total_iterations"] == 2
    assert done["final_answer"] == events[-3]["content"]
    assert done["final_answer"].startswith('You asked: "List all files in the current directory".')
    assert done["total_tokens"] == sum(e["tokens_used"] for e in events if e["event_type"] == "iteration_complete")
    assert isinstance(done["duration"], int)


async def check_task_view(client: httpx.AsyncClient, done: dict[str, Any]) -> None:
    task = (await client.get(f"/api/tasks/{done['task_id']}")).json()
    assert task["status"] == "completed"
    assert task["task_id"] == done["task_id"]
    assert task["session_id"] == "test-session"
    assert task["final_answer"] == done["final_answer"]
    assert task["iterations"] == 2
    assert task["error"] is None
    assert task["trace_id"] == done["trace_id"]
    usage = task["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["total_tokens"] == done["total_tokens"]
    stamps = [task["created_at"], task["started_at"], task["finished_at"]]
    assert all(TIMESTAMP.match(s) for s in stamps), stamps
    assert stamps == sorted(stamps)


async def check_session_view(client: httpx.AsyncClient, streamed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listed = await client.get("/api/sessions")
    assert listed.status_code == 200
    assert listed.json() == {"sessions": ["test-session"]}
    session = (await client.get("/api/sessions/test-session")).json()
    assert set(session) >= {"id", "messages", "todos", "created_at", "updated_at"}
    assert session["id"] == "test-session"
    assert session["todos"] == []
    assert TIMESTAMP.match(session["created_at"])
    assert session["updated_at"] >= session["created_at"]
    messages: list[dict[str, Any]] = session["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[1]["content"] == "List all files in the current directory"
    assert messages[-1]["content"] == streamed[-1]["final_answer"]
    stored = await client.get("/api/sessions/test-session/events", params={"after": 0, "limit": 100})
    assert stored.status_code == 200
    assert stored.json() == {"events": streamed, "next_after": None}, "the stored events differ from the stream's"
    return messages


async def check_deleted(server: ServerProcess, client: httpx.AsyncClient, task_ids: list[str]) -> None:
    deleted = await client.delete("/api/sessions/test-session")
    assert deleted.status_code == 204
    assert deleted.content == b""
    paths = ["/api/sessions/test-session", "/api/sessions/test-session/events",
             *(f"/api/tasks/{task_id}" for task_id in task_ids)]
    for path in paths:
        gone = await client.get(path)
        assert gone.status_code == 404, (path, gone.text)
        assert gone.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/api/sessions")).json() == {"sessions": ["fresh-session"]}
    assert not (server.data_dir / "workspaces" / "test-session").exists()


async def test_the_curl_walkthrough_step_by_step() -> None:
    with running(ALEX_SSE_HEARTBEAT_SECONDS="0.2") as server:
        async with (
            httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client,
            httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as anonymous,
        ):
            # 1. Open the event stream: `connected` at once, with no id.
            async with client.stream("GET", "/api/sse", params={"session_id": "test-session"},
                                     headers={"Accept": "text/event-stream"},
                                     timeout=httpx.Timeout(10.0, read=None)) as response:
                assert response.status_code == 200
                stream = RawStream(response.aiter_lines())
                try:
                    async with asyncio.timeout(STREAM_TIMEOUT):
                        first = await stream.next_frame()
                    assert (first.event, first.id, json.loads(first.data)) == (
                        "connected", None, {"session_id": "test-session"})

                    # 2. Submit a task; the stream shows every step through task_complete.
                    task_id = await submit(client, "List all files in the current directory", "test-session")
                    first_task = await stream.until_terminal(task_id)
                    check_listing_task(first_task, task_id)

                    # Heartbeats: `: ping` comments every ALEX_SSE_HEARTBEAT_SECONDS, with no id.
                    await stream.until_pings(2)

                    await check_task_view(client, first_task[-1])
                    # 3. and 4.: the sessions, the session, its stored events (the same as streamed).
                    messages = await check_session_view(client, first_task)

                    # A second task continues the conversation, on the same stream.
                    second_id = await submit(client, "$ echo second-turn-marker", "test-session")
                    second_task = await stream.until_terminal(second_id)
                finally:
                    await stream.aclose()
            assert second_task[-1]["event_type"] == "task_complete"
            assert "second-turn-marker" in second_task[-1]["final_answer"]
            check_envelopes(second_task, "test-session", second_id)
            check_ids_increase(first_task + second_task)
            assert second_task[0]["trace_id"] != first_task[0]["trace_id"]

            assert (await wait_finished(client, second_id))["status"] == "completed"
            grown = (await client.get("/api/sessions/test-session")).json()["messages"]
            assert grown[:5] == messages, "the earlier turn is kept as it was"
            assert [m["role"] for m in grown[5:]] == ["user", "assistant", "tool", "assistant"]
            assert grown[6]["tool_calls"][0]["name"] == "bash"
            assert "second-turn-marker" in grown[7]["content"]

            # The model saw the earlier turn: the same task in a fresh session sends it fewer prompt tokens.
            fresh_task = await wait_finished(client, await submit(client, "$ echo second-turn-marker",
                                                                  "fresh-session"))
            assert fresh_task["status"] == "completed"
            continued = (await client.get(f"/api/tasks/{second_id}")).json()
            assert continued["usage"]["prompt_tokens"] > fresh_task["usage"]["prompt_tokens"]

            everything = (await client.get("/api/sessions/test-session/events")).json()["events"]
            assert everything == first_task + second_task

            # DELETE: 204, then the session, its events and its tasks are gone.
            await check_deleted(server, client, [task_id, second_id])

            # 5. Health and readiness, without a token.
            health = await anonymous.get("/health")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            ready = await anonymous.get("/ready")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert not server.events_logged("request_failed")


# The README's curl commands, verbatim


def readme_sections() -> dict[str, list[str]]:
    """The ```bash and ```json blocks of each '### N.' section of the README's curl walk-through."""
    text = README.read_text(encoding="utf-8")
    walkthrough = text.split("## Walk-through with curl", 1)[1].split("\n## ", 1)[0]
    sections: dict[str, list[str]] = {}
    current = "0"
    for part in re.split(r"^(### .*)$", walkthrough, flags=re.MULTILINE):
        heading = re.match(r"^### (\d)\.", part)
        if heading:
            current = heading.group(1)
            continue
        if part.startswith("### "):
            current = "after"
            continue
        for lang, body in re.findall(r"```(bash|json)\n(.*?)```", part, flags=re.DOTALL):
            sections.setdefault(current, []).append(f"{lang}:{body}")
    return sections


def commands(block: str) -> list[str]:
    """The command lines of a bash block, continuations joined (a trailing comment stays: bash ignores it)."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def expected_comment(command: str) -> Any:
    """The JSON a command's trailing comment promises (``curl …   # {"status":"ok"} while …``), if any."""
    match = re.search(r"#\s*(\{.*?\})", command)
    return json.loads(match.group(1)) if match else None


class Shell:
    """Runs README commands with bash, the port swapped for the test server's and ``TOKEN`` in the environment."""

    def __init__(self, server: ServerProcess) -> None:
        self.port = str(server.port)
        self.env = {**clean_environment(), "ALEX_DATA_DIR": str(server.data_dir)}
        if "ALEX_JWT_SECRET" in server.env:
            self.env["ALEX_JWT_SECRET"] = server.env["ALEX_JWT_SECRET"]

    def localize(self, command: str) -> str:
        return command.replace(":8080", f":{self.port}")

    def mint(self, token_block: str) -> None:
        """The README's token line, run as written from the repository (same data folder and secret)."""
        minted = subprocess.run(["bash", "-c", token_block + '\nprintf %s "$TOKEN"'], cwd=REPO, env=self.env,
                                capture_output=True, text=True, timeout=30, check=False)
        assert minted.returncode == 0, minted.stderr
        self.env["TOKEN"] = minted.stdout.strip()
        assert self.env["TOKEN"].count(".") == 2, "not a JWT"

    def run(self, command: str) -> str:
        done = subprocess.run(["bash", "-c", self.localize(command)], env=self.env, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, (command, done.returncode, done.stderr)
        return done.stdout

    def start(self, command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["bash", "-c", "exec " + self.localize(command)], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def bash_block(blocks: list[str], index: int = 0) -> list[str]:
    bash = [b.removeprefix("bash:") for b in blocks if b.startswith("bash:")]
    return commands(bash[index])


def json_block(blocks: list[str]) -> str:
    return next(b.removeprefix("json:") for b in blocks if b.startswith("json:"))


def follow_and_submit(shell: Shell, sections: dict[str, list[str]]) -> str:
    """Sections 1 and 2: the stream in the background, the task submitted; returns the task id."""
    stream_commands = bash_block(sections["1"])
    assert len(stream_commands) == 1
    assert "curl -N" in stream_commands[0]
    follower = shell.start(stream_commands[0])
    try:
        lines = read_lines_until(follower, lambda line: line.startswith("data:"))
        assert lines[:2] == ["event: connected", 'data: {"session_id":"test-session"}'], lines

        submit_commands = bash_block(sections["2"])
        assert len(submit_commands) == 1
        accepted = json.loads(shell.run(submit_commands[0]))
        promised = json.loads(json_block(sections["2"]).replace("t_…", "t_x"))
        assert set(accepted) == set(promised)
        assert accepted["status"] == "accepted"
        assert accepted["session_id"] == "test-session"
        assert accepted["task_id"].startswith("t_")
        assert accepted["message"] == promised["message"]

        # The stream shows the events the README lists, through task_complete.
        streamed = read_lines_until(follower, lambda line: line == "event: task_complete")
        kinds = [line.removeprefix("event: ") for line in streamed if line.startswith("event: ")]
        for kind in ("task_analysis", "iteration_start", "thinking", "tool_call_start", "tool_call_complete",
                     "task_complete"):
            assert kind in kinds, (kind, kinds)
        assert any(line.startswith("id: ") for line in streamed)
    finally:
        follower.kill()
        follower.wait(10)
        reader = LINE_READERS.pop(follower.pid, None)
        while reader is not None and reader.get(timeout=10) is not None:
            pass  # the reader thread reaches the end of the output before the pipe is closed under it
        if follower.stdout is not None:
            follower.stdout.close()
    task_id: str = accepted["task_id"]
    return task_id


def test_make_run_then_the_readme_curl_commands_work_as_written() -> None:
    """As a new user does it: ``make run`` (no secret configured: the server makes one in its data folder), the
    README's token line against that folder, then its curl commands."""
    if shutil.which("curl") is None or shutil.which("make") is None:
        pytest.skip("curl and make are needed for the README's walk-through")
    with data_folder() as folder:
        server = ServerProcess(folder, command=["make", "--no-print-directory", "run"], cwd=REPO,
                               secret=None)
        try:
            server.start(timeout=300)  # make run installs first when pyproject.toml changed
            assert (folder / "jwt_secret").exists(), "the server did not make its secret"
            walk_the_readme(server)
        finally:
            server.kill()


def walk_the_readme(server: ServerProcess) -> None:
    sections = readme_sections()
    assert {"0", "1", "2", "3", "4", "5", "6"} <= set(sections), f"README sections changed: {sorted(sections)}"
    shell = Shell(server)
    token_block = next(b for b in sections["0"] if b.startswith("bash:")).removeprefix("bash:")
    assert "alex-server token --sub alice" in token_block
    shell.mint(token_block)

    task_id = follow_and_submit(shell, sections)

    # 3. List sessions: as the README shows.
    assert json.loads(shell.run(bash_block(sections["3"])[0])) == json.loads(json_block(sections["3"]))

    # 4. The session's details, then its stored events.
    details, events = bash_block(sections["4"])
    session = json.loads(shell.run(details))
    assert session["id"] == "test-session"
    assert {"messages", "todos", "created_at", "updated_at"} <= set(session)
    assert [m["role"] for m in session["messages"]][-1] == "assistant"
    stored = json.loads(shell.run(events))["events"]
    assert stored[-1]["event_type"] == "task_complete"
    assert stored[-1]["task_id"] == task_id

    # 5. Health and readiness answer what their comments say.
    for command in bash_block(sections["5"]):
        promised_body = expected_comment(command)
        assert promised_body is not None, command
        assert json.loads(shell.run(command)) == promised_body

    # 6. The metrics show the walk-through's task, finished.
    (scrape,) = bash_block(sections["6"])
    finished = dict(line.rsplit(" ", 1) for line in shell.run(scrape).splitlines())
    assert float(finished['alex_tasks_finished_total{outcome="completed"}']) == 1.0
    assert float(finished['alex_tasks_finished_total{outcome="failed"}']) == 0.0


def read_lines_until(process: subprocess.Popen[str], stop: Callable[[str], bool]) -> list[str]:
    """Lines of ``process``'s output up to and including the first one ``stop`` accepts, within a deadline."""
    lines: list[str] = []
    reader = LINE_READERS.get(process.pid)
    if reader is None:
        reader = LINE_READERS[process.pid] = start_line_reader(process)
    deadline = time.monotonic() + STREAM_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out: {lines}")
        try:
            line = reader.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"the stream ended: {lines}")
        lines.append(line)
        if stop(line):
            return lines


LINE_READERS: dict[int, queue.Queue[str | None]] = {}


def start_line_reader(process: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """A thread that hands over the process's output a line at a time (None at the end), so reads can time out."""
    assert process.stdout is not None
    stdout = process.stdout
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line.rstrip("\r\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


# alex-server run


def alex_server(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**clean_environment(), "ALEX_JWT_SECRET": SECRET}
    return subprocess.run([str(ALEX_SERVER), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


def test_alex_server_run_prints_the_task_and_exits_0() -> None:
    with running() as server:
        done = alex_server("run", "$ echo hello-from-run", "--url", server.base_url)
        check_run_output(server, done)


def check_run_output(server: ServerProcess, done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, (done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert '⚙ bash {"command": "echo hello-from-run"}' in lines
    assert "  │ hello-from-run" in lines, "the command's output, streamed"
    answer = [line for line in lines if line.startswith("✔ ")]
    assert answer == ['✔ You asked: "$ echo hello-from-run". The command printed:'], lines
    assert lines[lines.index(answer[0]) + 1] == "hello-from-run"
    assert re.search(r"^  2 iterations, \d+ tokens, \d+ ms$", done.stdout, flags=re.MULTILINE)
    # The task really ran on the server, for the subject the CLI minted a token for.
    with httpx.Client(base_url=server.base_url, headers=auth("cli"), timeout=10.0) as client:
        sessions = client.get("/api/sessions").json()["sessions"]
        assert len(sessions) == 1
        events = client.get(f"/api/sessions/{sessions[0]}/events").json()["events"]
        assert events[-1]["event_type"] == "task_complete"
        assert client.get(f"/api/tasks/{events[-1]['task_id']}").json()["status"] == "completed"


def test_alex_server_run_exits_1_when_the_model_fails(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"turns": [
        {"text": "Thinking hard.", "error": {"kind": "server", "message": "the scripted model fell over"}},
    ]}))
    with running(ALEX_MOCK_SCRIPT=str(script)) as server:
        done = alex_server("run", "$ echo never-run", "--url", server.base_url)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Thinking hard." in done.stdout
    assert "✖ the model failed: the scripted model fell over" in done.stdout
    assert "⚙" not in done.stdout, "no tool ran"


def test_alex_server_run_exits_4_when_the_server_is_unreachable() -> None:
    port = free_port()
    started = time.monotonic()
    done = alex_server("run", "$ echo x", "--url", f"http://127.0.0.1:{port}", timeout=30)
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert "alex-server:" in done.stderr
    assert time.monotonic() - started < 15
