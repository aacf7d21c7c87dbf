"""The bash tool against a real /bin/bash: streaming, the scrubbed environment, limits, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from service.adapters.tools.bash import BashTool
from service.domain.tools import ToolError, ToolRegistry
from tests.unit.tool_helpers import (
    StreamCollector,
    make_context,
    unique_sleep,
    wait_for_processes,
    wait_until_gone,
)


@pytest.fixture
def real_tmp_path(tmp_path: Path) -> Path:
    """tmp_path with its symbolic links resolved, as the command sees it."""
    return tmp_path.resolve()


def bash(timeout_seconds: float = 20.0, output_limit_bytes: int = 64 * 1024) -> BashTool:
    return BashTool(timeout_seconds=timeout_seconds, output_limit_bytes=output_limit_bytes)


async def test_streams_each_line_in_order_and_returns_the_output(tmp_path: Path) -> None:
    stream = StreamCollector()
    command = "for i in 1 2 3; do echo line $i; done"
    result = await bash().run({"command": command}, make_context(tmp_path, stream=stream))
    assert stream.chunks == ["line 1\n", "line 2\n", "line 3\n"]
    assert result == "line 1\nline 2\nline 3\n"


async def test_a_line_is_streamed_before_the_command_ends(tmp_path: Path) -> None:
    stream = StreamCollector()
    context = make_context(tmp_path, stream=stream)
    task = asyncio.create_task(bash().run({"command": "echo a; sleep 0.5; echo b"}, context))
    await asyncio.wait_for(stream.first.wait(), 5)
    assert stream.chunks == ["a\n"]
    assert not task.done()
    assert await task == "a\nb\n"
    assert stream.chunks == ["a\n", "b\n"]


async def test_a_final_partial_line_is_flushed(tmp_path: Path) -> None:
    stream = StreamCollector()
    result = await bash().run({"command": "echo one; printf 'no newline'"}, make_context(tmp_path, stream=stream))
    assert stream.chunks == ["one\n", "no newline"]
    assert result == "one\nno newline"


async def test_stderr_is_merged_and_bad_utf8_is_replaced(tmp_path: Path) -> None:
    result = await bash().run({"command": "echo out; echo err >&2; printf 'x\\377y\\n'"}, make_context(tmp_path))
    assert result == "out\nerr\nx\ufffdy\n"


async def test_runs_in_the_workspace(tmp_path: Path, real_tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("hi")
    result = await bash().run({"command": "pwd; ls"}, make_context(tmp_path))
    assert result == f"{real_tmp_path}\nhere.txt\n"


async def test_non_zero_exit_is_a_result_with_the_code(tmp_path: Path) -> None:
    result = await bash().run({"command": "echo oops; exit 3"}, make_context(tmp_path))
    assert result == "oops\n[exit code 3]"


async def test_no_output_says_so(tmp_path: Path) -> None:
    assert await bash().run({"command": "true"}, make_context(tmp_path)) == "[no output]"
    assert await bash().run({"command": "exit 1"}, make_context(tmp_path)) == "[exit code 1]"


async def test_the_environment_holds_no_server_secrets(
    tmp_path: Path, real_tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret-value")
    monkeypatch.setenv("ALEX_JWT_SECRET", "jwt-very-secret-value")
    monkeypatch.setenv("SOMETHING_ELSE", "unrelated-value")
    result = await bash().run({"command": "env"}, make_context(tmp_path))
    variables = dict(line.split("=", 1) for line in result.splitlines())
    assert "OPENAI_API_KEY" not in variables
    assert not [name for name in variables if name.startswith("ALEX_")]
    assert "very-secret" not in result
    assert "unrelated-value" not in result
    workspace = str(real_tmp_path)
    assert variables["HOME"] == workspace
    assert variables["TMPDIR"] == f"{workspace}/.tmp"
    assert variables["LANG"] == variables["LC_ALL"] == "C.UTF-8"
    assert variables["TERM"] == "dumb"
    assert (tmp_path / ".tmp").is_dir()


async def test_stdin_is_empty(tmp_path: Path) -> None:
    assert await bash().run({"command": "cat; echo done"}, make_context(tmp_path)) == "done\n"


async def test_output_past_the_limit_is_dropped_and_noted(tmp_path: Path) -> None:
    stream = StreamCollector()
    tool = bash(output_limit_bytes=1024)
    # 100 000 bytes in 11-byte lines, then an exit code: the command runs on to its end after the cut.
    result = await tool.run(
        {"command": "yes 0123456789 | head -c 100000; exit 4"}, make_context(tmp_path, stream=stream)
    )
    kept, _, rest = result.partition("[output truncated after 1024 bytes]")
    assert len(kept.encode()) == 1024 + 1  # the cut, then a newline before the note
    assert kept.startswith("0123456789\n0123456789\n")
    assert rest == "\n[exit code 4]"
    assert "[output truncated after 1024 bytes]" in stream.chunks[-1]
    assert len(stream.text.encode()) < 1024 + 100


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    marker = unique_sleep()
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"command timed out after 1 s") as caught:
        await bash().run(
            {"command": f"echo begun; sleep {marker} & sleep {marker}", "timeout_seconds": 1}, make_context(tmp_path)
        )
    assert time.monotonic() - started < 5
    assert "begun" in str(caught.value)
    assert await wait_until_gone(marker) == []


async def test_timeout_is_capped_at_the_configured_maximum(tmp_path: Path) -> None:
    marker = unique_sleep()
    started = time.monotonic()
    with pytest.raises(ToolError, match="timed out after 1 s"):
        await bash(timeout_seconds=1).run(
            {"command": f"sleep {marker}", "timeout_seconds": 600}, make_context(tmp_path)
        )
    assert time.monotonic() - started < 5
    assert await wait_until_gone(marker) == []


@pytest.mark.parametrize("requested", [float("nan"), float("inf")])
async def test_a_non_finite_timeout_means_the_maximum(tmp_path: Path, requested: float) -> None:
    with pytest.raises(ToolError, match="timed out after 1 s"):
        await bash(timeout_seconds=1).run({"command": "sleep 5", "timeout_seconds": requested}, make_context(tmp_path))


async def test_cancellation_kills_the_process_group_and_propagates(tmp_path: Path) -> None:
    marker = unique_sleep()
    stream = StreamCollector()
    task = asyncio.create_task(
        bash().run({"command": f"sleep {marker} & echo started; sleep {marker}"}, make_context(tmp_path, stream=stream))
    )
    await asyncio.wait_for(stream.first.wait(), 5)
    # Both sleeps (and bash, unless it exec'd the last one) are running.
    assert len(await wait_for_processes(marker, at_least=2)) >= 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert await wait_until_gone(marker) == []


async def test_background_children_do_not_keep_the_tool_waiting(tmp_path: Path) -> None:
    marker = unique_sleep()
    started = time.monotonic()
    # The subshell's sleep inherits stdout, so the pipe stays open after bash exits.
    result = await bash().run({"command": f"(sleep {marker} &); echo done"}, make_context(tmp_path))
    assert result == "done\n"
    assert time.monotonic() - started < 5
    assert await wait_until_gone(marker) == []


async def test_a_failing_stream_stops_the_command(tmp_path: Path) -> None:
    marker = unique_sleep()

    async def broken(chunk: str) -> None:
        raise ConnectionError("client gone")

    with pytest.raises(ConnectionError):
        await bash().run({"command": f"echo hi; sleep {marker}"}, make_context(tmp_path, stream=broken))
    assert await wait_until_gone(marker) == []


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({}, "arguments.command is required"),
        ({"command": ""}, "arguments.command must be at least 1 characters"),
        ({"command": 5}, "arguments.command must be of type string"),
        ({"command": "ls", "timeout_seconds": 0}, "arguments.timeout_seconds must be at least 1"),
        ({"command": "ls", "shell": "zsh"}, "arguments.shell is not a known argument"),
    ],
)
async def test_bad_arguments_are_refused_by_the_registry(
    tmp_path: Path, arguments: dict[str, object], problem: str
) -> None:
    registry = ToolRegistry([bash()])
    with pytest.raises(ToolError, match=problem):
        await registry.run("bash", arguments, make_context(tmp_path))


async def test_a_nul_byte_in_the_command_is_a_tool_error(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="could not start bash"):
        await bash().run({"command": "echo a\x00b"}, make_context(tmp_path))
