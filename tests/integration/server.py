"""The real server as a child process on 127.0.0.1 (port 0), for tests that talk to it over real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from service.tokens import mint_token

SECRET = "integration-test-secret-0123456789abcdef"
ALL_SCOPES = ("tasks:write", "sessions:read", "sessions:write")


def clean_environment() -> dict[str, str]:
    """The test process's environment without anything that configures the service."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ALEX_", "OPENAI_", "OTEL_")) and k != "PORT"}


def fresh_data_root() -> Path:
    """A folder for a server's data, outside pytest's temporary folder (which other pytest runs reset to 0700),
    passable by the bash sandbox's user."""
    root = Path(tempfile.mkdtemp(prefix="alex-test-"))
    root.chmod(0o711)
    return root


@contextlib.contextmanager
def data_folder() -> Iterator[Path]:
    """A data folder (not yet made) in a :func:`fresh_data_root`, removed afterwards."""
    root = fresh_data_root()
    try:
        yield root / "data"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running(data: Path | None = None, *, secret: str | None = SECRET, **env: str) -> Iterator[ServerProcess]:
    """A started server with ``env`` on top of the harness's defaults (in a fresh data folder unless ``data``);
    ``secret=None`` lets it make its own development secret."""
    with contextlib.ExitStack() as stack:
        folder = data if data is not None else stack.enter_context(data_folder())
        process = ServerProcess(folder, env=env, secret=secret).start()
        stack.callback(process.kill)
        yield process


def free_port() -> int:
    """A loopback port nobody listens on (bound, then closed): for a server that must keep its address, or for a
    peer that must not answer."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def make_traversable(folder: Path) -> None:
    """Let every user pass through ``folder`` and the folders above it that we own (pytest makes them 0700):
    the server refuses to start when its bash sandbox user cannot reach the workspaces."""
    folder.mkdir(parents=True, exist_ok=True)
    for step in [folder, *folder.parents]:
        info = step.stat()
        if info.st_uid == os.getuid() and not info.st_mode & 0o001:
            step.chmod(info.st_mode | 0o011)


class ServerProcess:
    """``alex-server serve`` in a child process; its JSON log lines are collected in :attr:`logs`."""

    def __init__(self, data_dir: Path, env: Mapping[str, str] | None = None, *,
                 command: list[str] | None = None, cwd: Path | None = None, secret: str | None = SECRET) -> None:
        """``command`` defaults to ``python -m service serve``; ``secret=None`` lets the server make its own."""
        self.data_dir = data_dir
        self.command = command or [sys.executable, "-m", "service", "serve"]
        self.cwd = cwd
        make_traversable(data_dir.parent)
        self.env = {
            **clean_environment(),
            "PORT": "0",
            "ALEX_HOST": "127.0.0.1",
            "ALEX_DATA_DIR": str(data_dir),
            "ALEX_LOG_FORMAT": "json",
            **({"ALEX_JWT_SECRET": secret} if secret is not None else {}),
            "ALEX_MOCK_DELAY_MS": "0",
            # Functional tests submit many tasks quickly; the rate-limit tests set their own limits.
            "ALEX_RATE_LIMIT_TASKS": "10000/minute",
            "ALEX_RATE_LIMIT_DEFAULT": "100000/minute",
            **(env or {}),
        }
        self.logs: list[dict[str, Any]] = []
        self.raw_logs: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self.port is not None, "server not started"
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[str]:
        assert self._process is not None, "server not started"
        return self._process

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self._listening.clear()
        self.port = None
        self._process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self._process,), daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout):
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.raw_logs[-40:]))
        self.wait_ready(timeout)
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.rstrip("\n")
            self.raw_logs.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            self.logs.append(record)
            if record.get("event") == "server_listening":
                self.port = int(record["port"])
                self._listening.set()
        process.stderr.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server never became ready:\n" + "\n".join(self.raw_logs[-40:]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Send ``sig`` and wait for the exit; returns how long the process took to exit, in seconds."""
        process = self.process
        if process.poll() is not None:
            return 0.0
        started = time.monotonic()
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            if self._reader is not None:
                self._reader.join(5)
        return time.monotonic() - started

    def kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    def events_logged(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs if r.get("event") == name]


def token(subject: str = "alice", scopes: tuple[str, ...] = ALL_SCOPES, ttl: int = 3600) -> str:
    return mint_token(SECRET, subject, scopes, ttl)


def auth(subject: str = "alice", scopes: tuple[str, ...] = ALL_SCOPES) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject, scopes)}"}
