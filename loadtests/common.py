"""What the benchmark commands share: child processes pinned to a core, their JSON lines, the service's
environment, and the tables they print."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER_CPU = 0
CLIENT_CPU = 1
SCRATCH_PREFIX = "perf7-"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pinned(command: Sequence[str], cpu: int | None) -> list[str]:
    """``command`` bound to one core with taskset (when there is one to spare and taskset is installed)."""
    if cpu is None or cpu not in cpus() or shutil.which("taskset") is None:
        return list(command)
    return ["taskset", "-c", str(cpu), *command]


def module(name: str) -> list[str]:
    return [sys.executable, "-m", name]


def new_secret() -> str:
    return secrets.token_urlsafe(48)


@contextlib.contextmanager
def scratch(keep: bool = False) -> Iterator[Path]:
    """A scratch folder (data folders, logs), removed afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def data_folder(folder: Path, name: str) -> Path:
    """A new data folder for one server under ``folder``, passable by the bash sandbox's user (as ``make run``'s)."""
    data = Path(tempfile.mkdtemp(prefix=f"data-{name}-", dir=folder))
    data.chmod(0o711)
    return data


def service_environment(data_dir: Path, secret: str, **overrides: str) -> dict[str, str]:
    """The service's environment for a benchmark: the defaults of ``alex-server serve``, a fresh data folder, a known
    secret (the client mints its tokens), JSON logs; ``overrides`` on top."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ALEX_", "OPENAI_", "OTEL_")) and k != "PORT"}
    return {
        **clean,
        "PORT": "0",
        "ALEX_HOST": "127.0.0.1",
        "ALEX_DATA_DIR": str(data_dir),
        "ALEX_JWT_SECRET": secret,
        "ALEX_LOG_FORMAT": "json",
        **overrides,
    }


class Child:
    """A child process that speaks JSON lines on stdout and takes commands on stdin; stderr goes to a file.

    ``reads_input``: the child stops at the end of its input (the benchmark's own servers and clients); the
    service itself does not, and is sent SIGTERM at once, as a deployment stops it.
    """

    def __init__(self, command: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
                 cpu: int | None = None, reads_input: bool = True) -> None:
        self.log = log
        self.reads_input = reads_input
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            pinned(command, cpu), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
            env=dict(env) if env is not None else None, text=True, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def expect(self, state: str, timeout: float) -> dict[str, Any]:
        """The next JSON line whose ``state`` is ``state``; raises when the child fails, exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {state!r} from {self.log.stem} within {timeout} s ({self.tail()})") from None
            if line is None:
                raise RuntimeError(f"{self.log.stem} exited before {state!r}: {self.tail()}")
            try:
                record: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if record.get("state") == "failed":
                raise RuntimeError(f"{self.log.stem} failed: {record.get('error')} ({self.tail()})")
            if record.get("state") == state:
                return record

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def cpu_seconds(self) -> float:
        """User and system CPU time the process has used so far (its threads included)."""
        user, system = self.cpu_times()
        return user + system

    def cpu_times(self) -> tuple[float, float]:
        """User and system (kernel) CPU time the process has used so far, apart (its threads included)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan"), float("nan")
        return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS

    def rss_bytes(self) -> int:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def tail(self, lines: int = 15) -> str:
        self._log_file.flush()
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """End of input (the cue of a child that reads it), then SIGTERM, then SIGKILL."""
        process = self.process
        with contextlib.suppress(OSError, ValueError):
            if process.stdin is not None:
                process.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                process.wait(timeout if self.reads_input or sig is signal.SIGKILL else 0.01)
                break
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        self._log_file.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class Check:
    """One target of a benchmark: what it asks, what was measured, and whether it holds."""

    target: str
    measured: str
    holds: bool


def count_losses(result: dict[str, Any]) -> dict[str, Any]:
    """A stream client's result, with ``lost``: how many deliveries short of the expected the run was, and
    ``out_of_order``: arrivals that were not the next of their session's sequence (a repeat, a skip or a swap). An
    exact run has both at 0. ``lost`` alone would not do: a repeated event makes up for a lost one there, which
    ``out_of_order`` then shows."""
    result["lost"] = max(0, result["expected"] - result["deliveries"])
    result["out_of_order"] = result["gaps"]
    return result


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (it reads as well in a terminal as in RESULTS.md)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def report(checks: Sequence[Check]) -> int:
    """Print the targets and return the exit status: 0 when all hold, 1 when one is missed."""
    print()
    print(table(["target", "measured", "holds"], [(c.target, c.measured, "yes" if c.holds else "NO")
                                                  for c in checks]))
    missed = [c for c in checks if not c.holds]
    print()
    print("all targets hold" if not missed else f"{len(missed)} target(s) missed")
    return 1 if missed else 0


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    return f"{os.cpu_count()} x {model}, {memory} GiB, Python {sys.version.split()[0]}, {os.uname().release}"
