"""Escapes tried from inside real tasks on the real server, and refused: secrets in the environment and in /proc,
the data folder, other sessions' workspaces, the network, the root filesystem, resource exhaustion (processes,
memory, output, time), and the file tools' paths (``..``, absolute, symbolic and hard links).

Commands reach bash the way a model's would: a task holding a line ``$ CMD`` makes the mock model call bash
with CMD; a mock script (``ALEX_MOCK_SCRIPT``) plays arbitrary tool calls. Results are read from the stored
``tool_call_complete`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server import SECRET, ServerProcess, auth

pytestmark = pytest.mark.integration

CANARY_KEY = "sk-canary-123"
NOBODY = 65534
BWRAP = shutil.which("bwrap")
PRLIMIT = shutil.which("prlimit")
SETPRIV = shutil.which("setpriv")
TASK_TIMEOUT = 60.0

needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bubblewrap (bwrap) is not installed: without it bash has "
                                                       "the network and sees the whole filesystem")
needs_prlimit = pytest.mark.skipif(PRLIMIT is None, reason="prlimit (util-linux) is not installed: no resource "
                                                           "limits apply to bash")
needs_root_and_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None,
    reason="bash changes to nobody only when the server runs as root and setpriv (util-linux) is installed")


@dataclass
class Planted:
    """What the tests leave lying around for bash to find: none of it may show up in its output."""

    root: Path
    data: Path
    decoy_secret: str
    host_canary: Path
    host_canary_text: str


@contextlib.contextmanager
def planted_folder() -> Iterator[Planted]:
    """A data folder with a world-readable decoy ``jwt_secret`` in it (only the sandbox, not its file mode, keeps
    bash from reading it), and a world-readable root-owned file beside it, the target of hard-link attempts.

    Not under /tmp: bubblewrap gives bash a fresh /tmp, which would hide the data folder for the wrong reason.
    Not under pytest's base temp folder either: that one is 0700, and a concurrent pytest session resets it.
    """
    root = Path(tempfile.mkdtemp(prefix="alex-sbx-", dir="/var/tmp" if Path("/var/tmp").is_dir() else None))
    root.chmod(0o711)
    data = root / "data"
    data.mkdir()
    decoy = "decoy-secret-" + secrets.token_hex(8)
    (data / "jwt_secret").write_text(decoy + "\n")
    (data / "jwt_secret").chmod(0o644)
    canary = root / "host-canary.txt"
    canary_text = "host-canary-" + secrets.token_hex(8)
    canary.write_text(canary_text + "\n")
    canary.chmod(0o644)
    try:
        yield Planted(root, data, decoy, canary, canary_text)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running(planted: Planted, env: Mapping[str, str]) -> Iterator[ServerProcess]:
    process = ServerProcess(planted.data, env=env).start()
    try:
        yield process
    finally:
        process.kill()


def secrets_of(planted: Planted) -> list[str]:
    """What no command may read. (The host canary is not here: bash sees the host's world-readable files, read
    only, by design; only the file tools must never reach it.)"""
    return [CANARY_KEY, SECRET, planted.decoy_secret, "SQLite format 3"]


@dataclass
class ToolRun:
    tool: str
    arguments: dict[str, Any]
    result: str
    error: str | None

    @property
    def text(self) -> str:
        return self.result + "\n" + (self.error or "")


async def run_task(client: httpx.AsyncClient, task: str, session_id: str | None = None,
                   during: Any = None) -> tuple[dict[str, Any], list[ToolRun]]:
    """Submit, wait for the end (calling ``during()`` at every poll), and return the task and its tool runs."""
    body: dict[str, Any] = {"task": task}
    if session_id is not None:
        body["session_id"] = session_id
    response = await client.post("/api/tasks", json=body)
    assert response.status_code == 202, response.text
    accepted = response.json()
    async with asyncio.timeout(TASK_TIMEOUT):
        while True:
            if during is not None:
                during()
            view: dict[str, Any] = (await client.get(f"/api/tasks/{accepted['task_id']}")).json()
            if view["status"] not in ("queued", "running"):
                break
            await asyncio.sleep(0.05)
    events = await stored_events(client, accepted["session_id"])
    starts = {e["call_id"]: e["arguments"] for e in events
              if e["event_type"] == "tool_call_start" and e["task_id"] == accepted["task_id"]}
    runs = [ToolRun(e["tool_name"], starts.get(e["call_id"], {}), e["result"], e["error"]) for e in events
            if e["event_type"] == "tool_call_complete" and e["task_id"] == accepted["task_id"]]
    return view, runs


async def stored_events(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after: str | None = "0"
    while after is not None:
        page = (await client.get(f"/api/sessions/{session_id}/events", params={"after": after, "limit": 1000})).json()
        events.extend(page["events"])
        after = page["next_after"]
    return events


async def bash(client: httpx.AsyncClient, command: str, session_id: str | None = None,
               during: Any = None) -> ToolRun:
    assert "\n" not in command
    _, runs = await run_task(client, f"$ {command}", session_id, during)
    assert [run.tool for run in runs] == ["bash"], runs
    assert runs[0].arguments == {"command": command}
    return runs[0]


def processes(argv: list[str]) -> list[int]:
    """The pids on this machine whose command line is exactly ``argv``."""
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
    return found


def processes_of(uid: int) -> list[int]:
    """The pids whose real user is ``uid``, zombies included: what the sandbox's process cap counts."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            found.append(int(entry.name))
                        break
    return found


async def until_processes_of(uid: int, at_most: int, seconds: float = 10) -> None:
    """Wait until ``uid`` has at most ``at_most`` processes (an earlier command's children may still be reaped)."""
    deadline = time.monotonic() + seconds
    while len(processes_of(uid)) > at_most:
        assert time.monotonic() < deadline, f"user {uid} still has processes: {processes_of(uid)}"
        await asyncio.sleep(0.1)


# The sandboxed server, with a model key and the JWT secret in its environment


@pytest.fixture(scope="module")
def planted() -> Iterator[Planted]:
    with planted_folder() as folder:
        yield folder


@pytest.fixture(scope="module")
def sandboxed(planted: Planted) -> Iterator[ServerProcess]:
    with running(planted, {
        "OPENAI_API_KEY": CANARY_KEY,
        "ALEX_LLM_PROVIDER": "mock",
        "ALEX_SANDBOX_MAX_PROCESSES": "64",
        "ALEX_SANDBOX_MEMORY_MB": "512",
        "ALEX_TOOL_OUTPUT_LIMIT_BYTES": "10000",
        "ALEX_BASH_TIMEOUT_SECONDS": "3",
    }) as process:
        yield process


@pytest.fixture
async def client(sandboxed: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandboxed.base_url, headers=auth("alice"), timeout=10) as http:
        yield http


def assert_no_secret(run: ToolRun, planted: Planted) -> None:
    for secret in secrets_of(planted):
        assert secret not in run.text, f"{secret!r} leaked into the tool's output"


@needs_root_and_setpriv
async def test_bash_runs_as_nobody(client: httpx.AsyncClient) -> None:
    run = await bash(client, "id -u; id -g; id -G")
    assert run.error is None
    assert run.result.split() == [str(NOBODY)] * 3


async def test_the_environment_holds_no_secret(client: httpx.AsyncClient, sandboxed: ServerProcess,
                                               planted: Planted) -> None:
    run = await bash(client, "env")
    assert run.error is None
    assert "HOME=" in run.result  # it really printed the environment
    assert_no_secret(run, planted)
    names = {line.partition("=")[0] for line in run.result.splitlines()}
    assert not {name for name in names if name.startswith(("ALEX_", "OPENAI", "OTEL_"))}, names


async def test_proc_shows_no_secret_of_the_server(client: httpx.AsyncClient, sandboxed: ServerProcess,
                                                  planted: Planted) -> None:
    server_pid = sandboxed.process.pid
    run = await bash(client, "cat /proc/1/environ; echo; cat /proc/$PPID/environ; echo; "
                             f"cat /proc/{server_pid}/environ; cat /proc/{server_pid}/cmdline; echo; "
                             "grep -a -l -r sk-canary /proc/[0-9]*/environ 2>/dev/null; ps -eo pid,args; "
                             "echo listed")
    assert "listed" in run.result
    assert_no_secret(run, planted)
    if BWRAP is not None:
        # A private /proc: the server and every process outside the sandbox are out of sight.
        assert "service serve" not in run.text
        assert "uvicorn" not in run.text


async def test_the_database_is_out_of_reach(client: httpx.AsyncClient, sandboxed: ServerProcess,
                                            planted: Planted) -> None:
    data = sandboxed.data_dir.resolve()
    run = await bash(client, f"cat ../../alex.db | head -c 64; cat {data}/alex.db | head -c 64; "
                             f"cp {data}/alex.db copy.db; sqlite3 {data}/alex.db .dump; echo tried")
    assert "tried" in run.result
    assert_no_secret(run, planted)


@needs_bwrap
async def test_the_data_folder_is_hidden(client: httpx.AsyncClient,
                                                                       sandboxed: ServerProcess,
                                                                       planted: Planted) -> None:
    data = sandboxed.data_dir.resolve()
    run = await bash(client, f"cat ../../jwt_secret; cat {data}/jwt_secret; ls -la ../.. {data}; echo tried")
    assert "tried" in run.result
    assert "No such file or directory" in run.result
    assert_no_secret(run, planted)


@needs_bwrap
async def test_another_sessions_workspace_cannot_be_listed_or_read(client: httpx.AsyncClient,
                                                                   sandboxed: ServerProcess,
                                                                   planted: Planted) -> None:
    session_a, session_b = "sbx-a-" + secrets.token_hex(4), "sbx-b-" + secrets.token_hex(4)
    private = "private-to-a-" + secrets.token_hex(8)
    written = await bash(client, f"echo {private} > a-notes.txt && echo written", session_a)
    assert written.result.strip() == "written"
    workspaces = (sandboxed.data_dir / "workspaces").resolve()
    assert (workspaces / session_a / "a-notes.txt").read_text().strip() == private

    run = await bash(client, f"ls -la ..; cat ../{session_a}/a-notes.txt; ls {workspaces}; "
                             f"cat {workspaces}/{session_a}/a-notes.txt; find .. ../.. -name a-notes.txt 2>&1; "
                             "echo tried", session_b)
    assert "tried" in run.result
    assert session_b in run.result  # ``ls ..`` did list something: this session's own folder
    for line in run.text.splitlines():
        if session_a in line:  # only in the errors about the paths tried
            assert "No such file or directory" in line, line
    assert private not in run.text
    assert_no_secret(run, planted)


@needs_bwrap
async def test_there_is_no_network(client: httpx.AsyncClient, sandboxed: ServerProcess) -> None:
    run = await bash(client, f"curl -s -m 2 http://127.0.0.1:{sandboxed.port}/health; echo curl-exit=$?")
    assert "curl-exit=" in run.result
    assert "curl-exit=0" not in run.result
    assert '"status"' not in run.result
    interfaces = await bash(client, "cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    assert interfaces.result.split() == ["lo"]


async def test_the_root_filesystem_is_read_only(client: httpx.AsyncClient) -> None:
    probe = "alex-sandbox-probe-" + secrets.token_hex(4)
    run = await bash(client, f"touch /usr/local/{probe}; echo usr=$?; touch /etc/{probe}; echo etc=$?; "
                             f"touch here-{probe} && echo workspace=ok")
    assert "usr=0" not in run.result
    assert "etc=0" not in run.result
    assert "workspace=ok" in run.result
    assert "Read-only file system" in run.result or "Permission denied" in run.result
    assert not await asyncio.to_thread(Path(f"/usr/local/{probe}").exists)
    assert not await asyncio.to_thread(Path(f"/etc/{probe}").exists)


@needs_bwrap
async def test_tmp_is_private_to_the_command(client: httpx.AsyncClient) -> None:
    probe = "alex-sandbox-tmp-" + secrets.token_hex(4)
    run = await bash(client, f"echo x > /tmp/{probe} && echo wrote")
    assert "wrote" in run.result
    assert not await asyncio.to_thread(Path(f"/tmp/{probe}").exists)


@needs_prlimit
async def test_a_fork_bomb_is_contained(client: httpx.AsyncClient) -> None:
    sleeper = ["sleep", "5.37"]
    peak = 0

    def sample() -> None:
        nonlocal peak
        peak = max(peak, len(processes(sleeper)))

    before = len(processes_of(NOBODY))
    started = time.monotonic()
    run = await bash(client, "for i in $(seq 2000); do sleep 5.37 & done; echo done", during=sample)
    assert time.monotonic() - started < 30, "the command did not end"
    assert "fork" in run.text
    assert "Resource temporarily unavailable" in run.text
    # The cap is 64 processes for the sandbox user: far below the 2000 asked for, whatever the sampling missed.
    assert peak <= 64
    deadline = time.monotonic() + 10
    while processes(sleeper):
        assert time.monotonic() < deadline, "the fork bomb's processes outlived the command"
        await asyncio.sleep(0.1)
    # Reaped too: until then they count against the cap of the tests that follow.
    await until_processes_of(NOBODY, at_most=before)


@needs_prlimit
async def test_a_memory_hog_is_stopped(client: httpx.AsyncClient) -> None:
    await until_processes_of(NOBODY, at_most=32)  # room under the cap of 64: the cap must not stop it first
    run = await bash(client, 'python3 -c "bytearray(3*1024**3)"; echo exit=$?')
    assert "MemoryError" in run.text
    assert "exit=1" in run.text


async def test_endless_output_is_capped(client: httpx.AsyncClient) -> None:
    run = await bash(client, "yes")
    assert run.error is not None
    assert run.error.startswith("command timed out after 3 s; output so far:\n")
    # 10000 bytes of output at most, plus the notes around them: never the megabytes ``yes`` wrote in 3 s.
    assert len(run.text) < 10_000 + 200
    shown = run.error.removeprefix("command timed out after 3 s; output so far:\n")
    lines = [line for line in shown.splitlines() if line]
    assert set(lines[:-1]) == {"y"}
    assert lines[-1].startswith(("[output truncated after 10000 bytes]", "[truncated: "))


async def test_the_truncation_note_reaches_the_model(client: httpx.AsyncClient) -> None:
    run = await bash(client, "yes | head -c 50000")
    assert run.error is None
    assert run.result.endswith("[output truncated after 10000 bytes]")


# The file tools, and a timeout, through scripted tool calls


SCRIPT: list[tuple[str, dict[str, Any]]] = [
    ("bash", {"command": "ln -s /etc escape && ln -s ../.. up && ln -s /etc/passwd pw && echo linked; "
                         "ln {canary} hard 2>&1; echo hard=$?"}),
    ("file_read", {"path": "../../jwt_secret"}),
    ("file_read", {"path": "/etc/passwd"}),
    ("file_write", {"path": "../x", "content": "escaped"}),
    ("file_write", {"path": "../../../x", "content": "escaped"}),
    ("file_read", {"path": "escape/passwd"}),
    ("file_read", {"path": "up/jwt_secret"}),
    ("file_read", {"path": "pw"}),
    ("file_write", {"path": "escape/alex-sandbox-escape", "content": "escaped"}),
    ("file_edit", {"path": "pw", "old_string": "root", "new_string": "toor"}),
    ("file_read", {"path": "hard"}),
    ("file_write", {"path": "hard", "content": "overwritten"}),
    ("list_files", {"path": "escape"}),
    ("list_files", {"path": "..", "recursive": True}),
    ("grep", {"pattern": "root:|decoy-secret|host-canary", "path": "."}),
    ("grep", {"pattern": "root", "path": "up"}),
    ("bash", {"command": "sleep 31.4 & sleep 31.5"}),
]
ESCAPES = range(1, 16)
"""The script's calls that try to leave the workspace."""


@pytest.fixture(scope="module")
def scripted_folder() -> Iterator[Planted]:
    with planted_folder() as folder:
        calls = [{"name": name, "arguments": {k: (v.format(canary=folder.host_canary) if isinstance(v, str) else v)
                                             for k, v in arguments.items()}} for name, arguments in SCRIPT]
        (folder.root / "script.json").write_text(json.dumps({"turns": [{"text": "Trying.", "tool_calls": calls}]}))
        yield folder


async def run_script(server: ServerProcess) -> list[ToolRun]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("mallory"), timeout=10) as client:
        view, runs = await run_task(client, "follow the script")
    assert view["status"] == "completed", view
    assert [run.tool for run in runs] == [name for name, _ in SCRIPT]
    return runs


def test_file_tools_refuse_every_way_out_and_a_timeout_kills_the_process_group(scripted_folder: Planted) -> None:
    with running(scripted_folder, {"ALEX_MOCK_SCRIPT": str(scripted_folder.root / "script.json"),
                                   "ALEX_BASH_TIMEOUT_SECONDS": "1"}) as server:
        started = time.monotonic()
        runs = asyncio.run(run_script(server))
        elapsed = time.monotonic() - started
        workspaces = (server.data_dir / "workspaces").resolve()

    linking, *escapes, sleeping = runs
    assert "linked" in linking.result, linking
    assert "hard=0" not in linking.result, "bash made a hard link to a file outside the workspace"
    for run in escapes:
        assert_no_secret(run, scripted_folder)
        assert scripted_folder.host_canary_text not in run.text
        assert "root:x:0:0" not in run.text
    for index in ESCAPES:
        run = runs[index]
        if run.tool == "grep" and run.arguments.get("path") == ".":
            # Searching the workspace is allowed; the links in it are skipped, never followed.
            assert run.error is None
            assert run.result == "no matches"
        elif run.tool == "list_files" and run.arguments.get("recursive"):
            assert run.error is not None, run
        elif run.tool == "file_read" and run.arguments.get("path") == "hard":
            # The hard link was never made (protected_hardlinks; under bubblewrap the workspace is its own mount).
            assert run.error is not None, run
        elif run.tool == "file_write" and run.arguments.get("path") == "hard":
            pass  # checked on the host file below
        else:
            assert run.error is not None, run
            assert "outside the workspace" in run.error or "'..'" in run.error or "absolute" in run.error, run
    assert scripted_folder.host_canary.read_text().strip() == scripted_folder.host_canary_text
    assert not Path("/etc/alex-sandbox-escape").exists()
    assert not (workspaces / "x").exists()
    assert not (workspaces.parent / "x").exists()
    assert not (workspaces.parent.parent / "x").exists()

    assert sleeping.error is not None
    assert "timed out after 1 s" in sleeping.error
    assert elapsed < 30
    deadline = time.monotonic() + 10
    while processes(["sleep", "31.4"]) or processes(["sleep", "31.5"]):
        assert time.monotonic() < deadline, "the timed-out command's background process survived"
        time.sleep(0.1)


def test_a_disabled_bash_cannot_be_called(scripted_folder: Planted) -> None:
    with running(scripted_folder, {"ALEX_MOCK_SCRIPT": str(scripted_folder.root / "script.json"),
                                   "ALEX_DISABLED_TOOLS": "bash"}) as server:
        runs = asyncio.run(run_script(server))
    bash_runs = [run for run in runs if run.tool == "bash"]
    assert len(bash_runs) == 2
    for run in bash_runs:
        assert run.error is not None
        assert "no tool named 'bash'" in run.error
        assert run.result == ""
    assert not processes(["sleep", "31.4"])
