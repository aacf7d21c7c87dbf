"""``alex-server``: ``serve`` (the default), ``token`` (mint a JWT for the configured key), ``run "TASK"``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import ctypes
import gc
import os
import sys
import time
from types import FrameType
from typing import Any

import structlog
import uvicorn

from service import __version__
from service.adapters.llm.mock import MockChatModel
from service.adapters.tools.sandbox import SandboxUnavailable, sandbox_from_settings
from service.api.stream_host import StreamHost
from service.app.access import DEFAULT_SCOPES, SCOPES
from service.config import ConfigError, Settings, load_settings
from service.main import create_app
from service.observability.logging import configure_logging
from service.terminal import run_task
from service.tokens import mint_token, signing_key

log = structlog.get_logger("service.cli")

PR_SET_DUMPABLE = 4
SHUTDOWN_STREAMS_SECONDS = 3.0
"""How long uvicorn waits for open connections after SIGTERM; streams are closed by the drain well before."""
HAND_OFF_STREAMS = True
"""Whether event streams leave the framework once open (:class:`~service.api.stream_host.StreamHost`): the request's
middleware frames, dependency caches and scope are freed when the stream starts instead of when it ends, about
half of a stream's memory. The request telemetry closes a handed-off stream's account (its log line, count and
span) when the stream ends, as for any other request."""
THREAD_SWITCH_SECONDS = 0.0005
"""How long a thread may hold the GIL while another waits for it (Python's default is 5 ms). The database and the
tools' file work run in helper threads whose results the event loop waits for: with the default, a query finished
while the loop is busy can wait 5 ms to hand its result back, and a task does dozens of them."""
GC_THRESHOLDS = (50_000, 20, 100)
"""The cyclic garbage collector's thresholds (Python's default: 700, 10, 10). Thousands of open streams are hundreds
of thousands of long-lived objects, and every event makes short-lived ones (futures, batches, messages): with the
defaults, collections of the older generations walk all the streams' objects again and again, and at 5,000
streams they took half the CPU and held the loop for hundreds of milliseconds at a time. Cycles are still
collected, tens of thousands of allocations later."""
LISTEN_BACKLOG = 4096
"""Connections the kernel queues before uvicorn accepts them: after a deploy, every client of a replica
reconnects at once (the kernel caps it at ``net.core.somaxconn``)."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which tells the application to drain on the first SIGTERM or SIGINT.

    Draining makes readiness fail, refuses new tasks and ends open streams at once, so that uvicorn's wait for
    open connections is short; running tasks then get the rest of the grace period in the lifespan's shutdown.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app.app if isinstance(self.config.app, StreamHost) else self.config.app
        container = getattr(getattr(app, "state", None), "container", None)
        if container is not None:
            # A signal handler runs in whatever context it interrupted: drain in an empty one, so that its log
            # lines do not carry an unrelated request's or task's ids.
            contextvars.Context().run(container.begin_drain)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        # What exists once the application has started (modules, the app, the container) lives as long as the
        # process: no collection needs to walk it again.
        gc.freeze()
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                log.info("server_listening", host=host, port=port, url=f"http://{host}:{port}")


def harden_process() -> None:
    """Files the server makes are its own (umask 077: the database, the secret, workspaces), and the process is
    not dumpable, so a command that runs as the same user cannot read its memory or ``/proc/PID/environ`` (which
    holds the model's key)."""
    os.umask(0o077)
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def prepare_process() -> None:
    """What ``serve`` sets up for the whole process before the application starts."""
    harden_process()
    sys.setswitchinterval(THREAD_SWITCH_SECONDS)
    gc.set_threshold(*GC_THRESHOLDS)


def preflight(settings: Settings) -> str | None:
    """What would stop the start, as one line for the operator; None when nothing does."""
    try:
        sandbox_from_settings(settings)
        if settings.provider == "mock" and settings.mock_script is not None:
            MockChatModel.from_settings(settings)
    except SandboxUnavailable as exc:
        return str(exc)
    except ValueError as exc:
        return f"ALEX_MOCK_SCRIPT: {exc}"
    return None


def serve(settings: Settings) -> int:
    problem = preflight(settings)
    if problem is not None:
        print(f"alex-server: configuration error: {problem}", file=sys.stderr)
        return 2
    prepare_process()
    configure_logging(settings.resolved_log_format, settings.log_level)
    DrainingServer(server_config(create_app(settings), settings)).run()
    return 0


def server_config(app: Any, settings: Settings, *, hand_off_streams: bool = HAND_OFF_STREAMS) -> uvicorn.Config:
    """How uvicorn serves the application: uvloop and httptools (the C event loop and HTTP parser, both from
    ``uvicorn[standard]``: every stream write and request parse goes through them), event streams writing their
    frames straight to the server (:class:`~service.api.stream_host.StreamHost`), no access log of its own (the
    service logs each request), and a listen backlog deep enough for thousands of streams reconnecting at once."""
    return uvicorn.Config(
        StreamHost(app, hand_off=hand_off_streams),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(SHUTDOWN_STREAMS_SECONDS),
        server_header=False,
        backlog=LISTEN_BACKLOG,
    )


def _external_keys(settings: Settings) -> bool:
    if settings.jwt_public_key is None and settings.jwt_public_key_file is None and settings.jwt_jwks_url is None:
        return False
    print("alex-server: this server verifies tokens signed by your identity provider (ALEX_JWT_PUBLIC_KEY, "
          "ALEX_JWT_PUBLIC_KEY_FILE or ALEX_JWT_JWKS_URL); mint them there", file=sys.stderr)
    return True


def token(settings: Settings, args: argparse.Namespace) -> int:
    if _external_keys(settings):
        return 2
    scopes = args.scope.split() if args.scope else list(DEFAULT_SCOPES)
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        print(f"alex-server: unknown scope {unknown[0]!r}; scopes are: {' '.join(SCOPES)}", file=sys.stderr)
        return 2
    key = signing_key(settings)
    print(mint_token(key.secret, args.sub, scopes, args.ttl, issuer=settings.jwt_issuer,
                     audience=settings.jwt_audience))
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104 -- reading, not binding
    url = args.url or f"http://{host}:{settings.port}"
    bearer = args.token
    if bearer is None and settings.auth_enabled and _external_keys(settings):
        return 2
    if bearer is None and settings.auth_enabled:
        bearer = mint_token(signing_key(settings).secret, "cli", DEFAULT_SCOPES, 3600,
                            issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    try:
        return asyncio.run(run_task(url, args.task, args.session, bearer, color=sys.stdout.isatty()))
    except KeyboardInterrupt:
        return 130


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="alex-server", description=__doc__)
    top.add_argument("--version", action="version", version=f"alex-server {__version__}")
    commands = top.add_subparsers(dest="command")
    commands.add_parser("serve", help="run the service (the default)")
    minting = commands.add_parser("token", help="mint a JWT for the configured key")
    minting.add_argument("--sub", default="dev", help="the subject (session owner); default: dev")
    minting.add_argument("--scope", default=None,
                         help=f"space-separated scopes; default: {' '.join(DEFAULT_SCOPES)}")
    minting.add_argument("--ttl", type=int, default=24 * 3600, help="lifetime in seconds; default: 86400")
    running = commands.add_parser("run", help="submit a task to a running server and print its events live")
    running.add_argument("task", help="what the agent should do")
    running.add_argument("--url", default=None, help="the server; default: http://HOST:PORT from the settings")
    running.add_argument("--session", default=None, help="continue this session (default: a new one)")
    running.add_argument("--token", default=None, help="a bearer token (default: minted for the configured key)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"alex-server: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        return token(settings, args)
    if args.command == "run":
        return run(settings, args)
    started = time.monotonic()
    code = serve(settings)
    log.info("process_exit", seconds=round(time.monotonic() - started, 1))
    return code


if __name__ == "__main__":
    sys.exit(main())
