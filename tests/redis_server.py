"""A real redis-server for the tests, on a free loopback port, in a folder of its own.

Every test that needs Redis starts its own (never the machine's shared one on 6379), so tests share no state and
run the same on a fresh machine. ``make test`` installs Debian's redis-server; without it these tests fail with a
message saying so rather than skip: the Redis backend is part of what CI proves.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from redis.asyncio import Redis

from service.adapters.redis.client import connect

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``stop`` and ``start`` again keep its data (append-only file) and its port."""

    def __init__(self, folder: Path, *, persistent: bool = True) -> None:
        self.folder = folder
        self.port = _free_port()
        self.persistent = persistent
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError(f"{REDIS_SERVER} is missing: `make test` installs it (apt-get install redis-server)")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self._process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not redis_answers(self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server never answered PING")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop it as an operator's restart would (SIGTERM: it writes what it holds, then exits)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "redis.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(no log)"


@contextlib.contextmanager
def redis_server(*, persistent: bool = True) -> Iterator[RedisServer]:
    folder = Path(tempfile.mkdtemp(prefix="alex-redis-"))
    server = RedisServer(folder, persistent=persistent)
    try:
        yield server.start()
    finally:
        server.kill()
        shutil.rmtree(folder, ignore_errors=True)


async def emptied(server: RedisServer) -> str:
    """The server, emptied of every key (a module's Redis between two tests): its URL."""
    client = connect(server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    return server.url


async def service_connections(server: RedisServer) -> int:
    """The server's connections opened by the service's clients (they name themselves ``alex-server``), counted
    by a client that does not."""
    observer = Redis.from_url(server.url, decode_responses=True)
    try:
        clients = await observer.client_list()
    finally:
        await observer.aclose()
    return sum(1 for client in clients if client.get("name") == "alex-server")
