"""``alex-server run``: submit a task, print its events live and readable, exit with its outcome.

Exit codes: 0 completed; 1 failed (an ``error`` event, which is also how a task interrupted by a crash ends);
3 cancelled (``task_cancelled``: by a client, or at a server's shutdown); 4 the server refused or could not be
reached; 130 Ctrl-C (the task is cancelled on the server too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any, TextIO

import httpx

from service.client import follow
from service.domain.models import new_session_id

EXIT_COMPLETED, EXIT_FAILED, EXIT_CANCELLED, EXIT_UNREACHABLE, EXIT_CTRL_C = 0, 1, 3, 4, 130


class Printer:
    """Turns events into lines a person can follow; thinking text streams in place."""

    def __init__(self, out: TextIO, *, color: bool) -> None:
        self._out = out
        self._color = color
        self._mid_line = False

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self._color else text

    def _line(self, text: str) -> None:
        if self._mid_line:
            self._out.write("\n")
            self._mid_line = False
        self._out.write(text + "\n")
        self._out.flush()

    def show(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type == "task_analysis":
            self._line(self._paint("1", f"▶ {data.get('goal', '')}"))
        elif event_type == "iteration_start":
            self._line(self._paint("2", f"── iteration {data.get('iteration')} ──"))
        elif event_type == "thinking":
            self._out.write(str(data.get("delta", "")))
            self._out.flush()
            self._mid_line = not str(data.get("delta", "")).endswith("\n")
        elif event_type == "think_complete":
            if self._mid_line:
                self._line("")
        elif event_type == "tool_call_start":
            arguments = json.dumps(data.get("arguments", {}), ensure_ascii=False)
            self._line(self._paint("36", f"⚙ {data.get('tool_name')} {arguments}"))
        elif event_type == "tool_call_stream":
            for line in str(data.get("chunk", "")).splitlines():
                self._line(self._paint("2", f"  │ {line}"))
        elif event_type == "tool_call_complete":
            if data.get("error"):
                self._line(self._paint("31", f"  ✗ {data['error']} ({data.get('duration')} ms)"))
            else:
                result = str(data.get("result", ""))
                shown = result if len(result) <= 400 else result[:400] + "…"
                for line in shown.splitlines() or [""]:
                    self._line(f"  → {line}")
                self._line(self._paint("2", f"  ✓ {data.get('duration')} ms"))
        elif event_type == "task_complete":
            self._line(self._paint("1;32", "✔ " + str(data.get("final_answer", ""))))
            self._line(self._paint("2", f"  {data.get('total_iterations')} iterations, "
                                        f"{data.get('total_tokens')} tokens, {data.get('duration')} ms"))
        elif event_type == "task_cancelled":
            self._line(self._paint("33", f"■ cancelled: {data.get('reason')}"))
        elif event_type == "error":
            self._line(self._paint("1;31", f"✖ {data.get('error')}"))


def _outcome(event_type: str) -> int | None:
    return {"task_complete": EXIT_COMPLETED, "error": EXIT_FAILED, "task_cancelled": EXIT_CANCELLED}.get(event_type)


async def run_task(url: str, task: str, session_id: str | None, bearer: str | None, *, color: bool,
                   out: TextIO = sys.stdout) -> int:
    session_id = session_id or new_session_id()
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    printer = Printer(out, color=color)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0) as client:
        submitted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        try:
            return await _watch(client, session_id, task, submitted, printer)
        except (httpx.HTTPError, OSError) as exc:
            print(f"alex-server: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except asyncio.CancelledError:
            if submitted.done():
                with contextlib.suppress(httpx.HTTPError):
                    await client.post(f"/api/tasks/{submitted.result()}/cancel")
            raise


async def _watch(client: httpx.AsyncClient, session_id: str, task: str, submitted: asyncio.Future[str],
                 printer: Printer) -> int:
    """Open the stream first (so no event is missed), submit once it is connected, print until the task ends."""
    async for message in follow(client, session_id):
        if message.event == "connected":
            response = await client.post("/api/tasks", json={"task": task, "session_id": session_id})
            if response.status_code != 202:
                print(f"alex-server: the server refused the task: {response.status_code} {response.text}",
                      file=sys.stderr)
                return EXIT_UNREACHABLE
            submitted.set_result(response.json()["task_id"])
            continue
        data = message.json()
        if not submitted.done() or data.get("task_id") != submitted.result():
            continue  # an earlier task's events, replayed
        printer.show(message.event, data)
        outcome = _outcome(message.event)
        if outcome is not None:
            return outcome
    print("alex-server: the stream ended before the task did", file=sys.stderr)
    return EXIT_UNREACHABLE
