"""The bash tool: a shell command in the session workspace, its output streamed line by line."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from service.adapters.tools.sandbox import Sandbox
from service.domain.tools import ToolContext, ToolError

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The commands' PATH: fixed, not inherited, as the server's own PATH (a virtualenv, say) is not theirs."""

_TMP_FOLDER = ".tmp"
_READ_CHUNK = 64 * 1024
# On Python 3.11 Process.wait() returns only once the output pipe is closed too, and a background child can
# hold it open for ever; so the main process's exit is noticed by polling ``returncode``, this often.
_EXIT_POLL_SECONDS = 0.05
# Once the group is killed the pipe closes when its last writer dies. A writer that left the group (setsid) is
# out of reach; this bounds how long we wait for it before leaving its output behind.
_CLEANUP_SECONDS = 5.0

_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "minLength": 1, "description": "The command line, for /bin/bash -c."},
        "timeout_seconds": {
            "type": "number",
            "minimum": 1,
            "description": "Kill the command after this many seconds (capped at the configured maximum).",
        },
    },
    "required": ["command"],
    "additionalProperties": False,
}


class _Output:
    """Keeps output up to ``limit`` bytes and streams it a line at a time; past the limit it discards.

    Lines are split on bytes before decoding (UTF-8 never has a newline byte inside a character), so each line
    decodes on its own; undecodable bytes become U+FFFD.
    """

    def __init__(self, limit: int, stream: Callable[[str], Awaitable[None]]) -> None:
        self._limit = limit
        self._stream = stream
        self._kept = 0
        self._pending = bytearray()
        self._parts: list[str] = []
        self.truncated = False
        self.silenced = False
        """Set when the tool is cancelled: output is still drained (so the pipe can close), not streamed."""

    @property
    def note(self) -> str:
        return f"[output truncated after {self._limit} bytes]"

    def text(self) -> str:
        return "".join(self._parts)

    async def pump(self, reader: asyncio.StreamReader) -> None:
        """Read to end of file, streaming every complete line, then the final partial one."""
        while chunk := await reader.read(_READ_CHUNK):
            for piece in self._take(chunk):
                if not self.silenced:
                    await self._stream(piece)
        if self._pending:
            tail = self._flush()
            if not self.silenced:
                await self._stream(tail)

    def _take(self, chunk: bytes) -> list[str]:
        if self.truncated:
            return []
        room = self._limit - self._kept
        if len(chunk) > room:
            chunk = chunk[:room]
            self.truncated = True
        self._kept += len(chunk)
        self._pending += chunk
        pieces: list[str] = []
        end = self._pending.rfind(b"\n") + 1
        if end:
            complete = bytes(self._pending[:end])
            del self._pending[:end]
            pieces = [line.decode("utf-8", errors="replace") for line in complete.splitlines(keepends=True)]
            self._parts.extend(pieces)
        if self.truncated:
            if self._pending:
                pieces.append(self._flush())
            pieces.append(("" if self.text().endswith("\n") else "\n") + self.note + "\n")
        return pieces

    def _flush(self) -> str:
        tail = self._pending.decode("utf-8", errors="replace")
        self._pending.clear()
        self._parts.append(tail)
        return tail


class BashTool:
    """Runs ``/bin/bash -c COMMAND`` in the workspace, in its own process group, with a scrubbed environment.

    Output (stdout and stderr merged) streams through ``context.stream`` one line at a time and is kept up
    to ``output_limit_bytes``; past that it is read and thrown away, so the command still runs to its end.
    When the main process exits, whatever it left running in its group is killed. A timeout kills the group
    and raises :class:`ToolError` with the output so far; cancellation kills the group, reaps it and
    propagates. A non-zero exit is a result, not an error: ``[exit code N]`` follows the output.
    """

    name = "bash"
    parameters = _PARAMETERS

    def __init__(self, timeout_seconds: float, output_limit_bytes: int, path: str = DEFAULT_PATH,
                 sandbox: Sandbox | None = None) -> None:
        self._timeout = timeout_seconds
        self._limit = output_limit_bytes
        self._path = path
        self._sandbox = sandbox

    @property
    def description(self) -> str:
        return (
            "Run a shell command with /bin/bash -c in the session workspace (the current directory) and "
            "return its combined stdout and stderr, followed by [exit code N] when it fails. "
            f"Output beyond {self._limit} bytes is discarded. "
            f"The command is killed after timeout_seconds (default and maximum {self._timeout:g} s). "
            "There is no stdin, so use non-interactive flags (-y, --no-pager). Background processes are "
            "killed when the command ends. The environment is minimal: HOME is the workspace, and no "
            "credentials are set."
        )

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        command = str(arguments["command"])
        timeout = self._timeout_for(arguments.get("timeout_seconds"))
        workspace = context.workspace
        try:
            await asyncio.to_thread(_prepare, workspace, self._sandbox)
        except OSError as exc:
            raise ToolError(f"cannot prepare the workspace: {exc.strerror or exc}") from None
        tmp = workspace / _TMP_FOLDER
        argv = ["/bin/bash", "-c", command]
        if self._sandbox is not None:
            argv = self._sandbox.command(argv, workspace)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=workspace,
                env=self._environment(workspace, tmp),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the command
            raise ToolError(f"could not start bash: {exc}") from None
        if process.stdout is None:
            raise RuntimeError("the subprocess has no stdout pipe")
        output = _Output(self._limit, context.stream)
        reader = asyncio.create_task(output.pump(process.stdout))
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                await _wait_for_exit(process, reader)
        except BaseException as exc:  # the timeout, a cancellation, or the stream callback failed
            timed_out = isinstance(exc, TimeoutError) and deadline.expired()
            output.silenced = not timed_out
            await _stop(process, reader)
            if not timed_out:
                raise
            shown = output.text() + ("\n" + output.note if output.truncated else "")
            raise ToolError(f"command timed out after {timeout:g} s; output so far:\n{shown}") from None
        await _stop(process, reader)
        if not reader.cancelled() and (failure := reader.exception()) is not None:
            raise failure
        return _result(output, process.returncode)

    def _timeout_for(self, requested: Any) -> float:
        # JSON from the model may carry NaN or Infinity (json.loads accepts both): they mean the default.
        if requested is None or not math.isfinite(float(requested)):
            return self._timeout
        return min(max(float(requested), 1.0), self._timeout)

    def _environment(self, workspace: Path, tmp: Path) -> dict[str, str]:
        # An allow-list: the server's environment holds its API keys and ALEX_* settings.
        return {
            "PATH": self._path,
            "HOME": str(workspace),
            "PWD": str(workspace),
            "TMPDIR": str(tmp),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TERM": "dumb",
        }


def _prepare(workspace: Path, sandbox: Sandbox | None) -> None:
    """Make sure the workspace and its temporary folder exist (and belong to the sandbox's user)."""
    (workspace / _TMP_FOLDER).mkdir(parents=True, exist_ok=True)
    if sandbox is not None:
        sandbox.give(workspace)
        sandbox.give(workspace / _TMP_FOLDER)


async def _wait_for_exit(process: asyncio.subprocess.Process, reader: asyncio.Task[None]) -> None:
    """Return when the main process has exited, or raise what the reader raised."""
    while process.returncode is None and not reader.done():
        await asyncio.wait({reader}, timeout=_EXIT_POLL_SECONDS)
    if reader.done():
        reader.result()
        # The pipe is closed, so wait() no longer depends on anyone else's descendants.
        await process.wait()


async def _stop(process: asyncio.subprocess.Process, reader: asyncio.Task[None]) -> None:
    """Kill the process group, let the reader drain the pipe to its end, and reap the main process."""
    _kill_group(process.pid)
    try:
        async with asyncio.timeout(_CLEANUP_SECONDS):
            await asyncio.wait({reader})
            await process.wait()
    except TimeoutError:
        pass
    finally:
        if not reader.done():
            reader.cancel()
            # wait(), not await: the reader's CancelledError must not be mistaken for (or hide) our own.
            await asyncio.wait({reader})
        if not reader.cancelled():
            reader.exception()  # retrieved here so a failure on the cancellation path is not logged as lost


def _kill_group(pgid: int) -> None:
    # SIGKILL at once, no SIGTERM grace: a timed-out or cancelled command is to stop now, and the workspace
    # holds nothing a graceful shutdown would save. ESRCH just means the group is already gone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _result(output: _Output, returncode: int | None) -> str:
    text = output.text()
    if output.truncated:
        text += ("" if text.endswith("\n") else "\n") + output.note
    if returncode:
        status = f"[exit code {returncode}]"
        if returncode < 0:
            with contextlib.suppress(ValueError):
                status = f"[exit code {returncode}: killed by {signal.Signals(-returncode).name}]"
        text += ("" if not text or text.endswith("\n") else "\n") + status
    return text or "[no output]"
