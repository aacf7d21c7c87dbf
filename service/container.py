"""The composition root: the one place that picks adapters from Settings and wires the use cases.

``build_container(settings, **overrides)`` builds everything (tests pass fakes as keyword arguments);
``Container.close`` releases it. Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import start_http_server

from service import __version__
from service.adapters.auth.jwks import JwksKeys
from service.adapters.broker.memory import MemoryBroker
from service.adapters.broker.tasks import LocalTaskBoard
from service.adapters.llm import build_chat_model
from service.adapters.redis import open_redis
from service.adapters.store.sqlite import SqliteDatabase
from service.adapters.store.sqlite_events import SqliteEventLog
from service.adapters.store.sqlite_sessions import SqliteSessionStore
from service.adapters.tools import build_tools
from service.adapters.tools.sandbox import Sandbox, sandbox_from_settings
from service.app.ports import ClientStreams, EventLog, SessionStore, TaskBoard
from service.app.runner import INTERRUPTED_BY_LOST_REPLICA, TaskRunner
from service.app.sessions import SessionService
from service.app.stream import emit_burst
from service.app.workspaces import Workspaces
from service.config import Settings
from service.domain.engine import DEFAULT_SYSTEM_PROMPT, EngineConfig, ReactEngine
from service.domain.llm import ChatModel
from service.domain.tools import Tool, ToolRegistry
from service.observability.agent import AgentTelemetry
from service.observability.metrics import Metrics, watch_event_loop
from service.observability.tracing import TRACER_NAME, build_tracer_provider
from service.tokens import KeySource, PublicKey, SigningKey, TokenVerifier, signing_key

log = structlog.get_logger("service.container")

TOOL_NOTE_ROOM = 1024
CLOSE_RESERVE_SECONDS = 0.5
"""Kept back from the grace period for storing interrupted tasks and closing the stores."""


@dataclass
class Container:
    settings: Settings
    store: SessionStore
    events: EventLog
    chat_model: ChatModel
    runner: TaskRunner
    sessions: SessionService
    verifier: TokenVerifier | None
    signing_key: SigningKey | None
    metrics: Metrics
    sandbox: Sandbox | None = None
    closers: list[Any] = field(default_factory=list)
    ready: bool = False
    drain_started: float | None = None

    def begin_drain(self) -> None:
        """SIGTERM: readiness goes 503, new tasks are refused, open streams end (clients resume elsewhere)."""
        if self.drain_started is not None:
            return
        self.drain_started = time.monotonic()
        self.ready = False
        self.runner.begin_drain()
        self.events.close_subscriptions("draining")
        log.info("drain_started", running_tasks=self.runner.running_count)

    async def close(self) -> None:
        """Drain (if SIGTERM did not already), give running tasks what is left of the grace period, release all."""
        self.begin_drain()
        assert self.drain_started is not None
        spent = time.monotonic() - self.drain_started
        await self.runner.shutdown(max(0.0, self.settings.shutdown_grace_seconds - spent - CLOSE_RESERVE_SECONDS))
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("close_failed", closer=getattr(closer, "__qualname__", repr(closer)))


async def build_container(
    settings: Settings,
    *,
    chat_model: ChatModel | None = None,
    tools: list[Tool] | None = None,
    store: SessionStore | None = None,
    events: EventLog | None = None,
    metrics: Metrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Container:
    closers: list[Any] = []
    metrics = metrics if metrics is not None else Metrics()
    if tracer_provider is None:
        tracer_provider = build_tracer_provider(settings)
    # Last to close: the spans of the tasks the drain interrupts are still to be sent.
    closers.append(functools.partial(asyncio.to_thread, tracer_provider.shutdown))
    # Traversable but not listable: the bash sandbox's user reaches its own workspace by path, nothing else.
    for folder in (settings.data_dir, settings.workspaces_dir):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o711)
    storage = await _open_storage(settings, closers, store, events)
    if chat_model is None:
        chat_model = build_chat_model(settings)
        aclose = getattr(chat_model, "aclose", None)
        if aclose is not None:
            closers.append(aclose)
    sandbox = sandbox_from_settings(settings)
    registry = ToolRegistry(tools if tools is not None else build_tools(settings, sandbox))
    telemetry = AgentTelemetry(tracer_provider.get_tracer(TRACER_NAME, __version__), metrics,
                               provider=settings.provider, model=chat_model.model, tools=registry.names,
                               capture_content=settings.trace_content)
    engine = ReactEngine(
        chat_model,
        registry,
        EngineConfig(
            max_iterations=settings.max_iterations,
            context_tokens=settings.context_tokens,
            system_prompt=settings.system_prompt or DEFAULT_SYSTEM_PROMPT,
            analyze=settings.task_analysis,
            # The tools cap their own output and say so; the engine's cap is a backstop with room for that note.
            tool_result_limit=settings.tool_output_limit_bytes + TOOL_NOTE_ROOM,
        ),
        telemetry=telemetry,
    )
    workspaces = Workspaces(settings.workspaces_dir)
    store, events = storage.store, storage.events
    runner = TaskRunner(
        store,
        events,
        engine,
        workspaces,
        max_task_chars=settings.max_task_chars,
        max_tasks_per_client=settings.max_tasks_per_client,
        metrics=metrics,
        board=storage.board if storage.board is not None else LocalTaskBoard(),
        concurrency=settings.worker_concurrency,
        replica=storage.replica,
        # With Redis, a task's outcome waits for a short outage to end rather than be lost (the lease holds it).
        settle_retry_seconds=settings.task_lease_seconds if storage.board is not None else 0.0,
        emit_burst=emit_burst(settings.sse_buffer_size),
    )
    sessions = SessionService(
        store,
        events,
        runner,
        workspaces,
        stream_buffer_size=settings.sse_buffer_size,
        max_streams_per_client=settings.max_streams_per_client,
        max_streams=settings.max_streams,
        client_streams=storage.client_streams,
    )
    key: SigningKey | None = None
    verifier: TokenVerifier | None = None
    if settings.auth_enabled:
        source: KeySource | str
        pem = settings.public_key_pem
        if pem is not None:
            source = PublicKey(pem)
        elif settings.jwt_jwks_url is not None:
            http = httpx.AsyncClient(follow_redirects=False)
            closers.append(http.aclose)
            source = JwksKeys(settings.jwt_jwks_url, http, max_age_seconds=settings.jwt_jwks_cache_seconds,
                              min_refresh_seconds=settings.jwt_jwks_min_refresh_seconds)
        else:
            key = signing_key(settings)
            source = key.secret
        verifier = TokenVerifier(source, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                                 leeway=settings.jwt_leeway_seconds)
    metrics.describe_build(__version__, settings.provider, chat_model.model)
    metrics.sse_connections_limit.set(settings.max_streams)
    if settings.metrics_enabled and settings.metrics_port is not None:
        server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
        closers.append(functools.partial(asyncio.to_thread, _stop_server, server))
        log.info("metrics_listening", host=settings.host, port=settings.metrics_port)
    watcher = asyncio.create_task(watch_event_loop(metrics.event_loop_lag), name="event loop lag")
    closers.append(functools.partial(_stop, watcher))
    return Container(settings, store, events, chat_model, runner, sessions, verifier, key, metrics, sandbox,
                     closers)


@dataclass
class _Storage:
    store: SessionStore
    events: EventLog
    board: TaskBoard | None = None
    client_streams: ClientStreams | None = None
    replica: str = "local"


async def _open_storage(settings: Settings, closers: list[Any], store: SessionStore | None,
                        events: EventLog | None) -> _Storage:
    """Redis when ``ALEX_REDIS_URL`` is set (and no test passed its own store and log); else SQLite."""
    if settings.redis_url is not None and store is None and events is None:
        backend = await open_redis(settings, interrupted_reason=INTERRUPTED_BY_LOST_REPLICA)
        closers.extend(reversed(backend.closers))
        return _Storage(backend.store, backend.events, backend.board, backend.client_streams, backend.replica)
    if store is None or events is None:
        db = await SqliteDatabase.open(settings.database_path)
        closers.append(db.close)
        if store is None:
            store = SqliteSessionStore(db)
        if events is None:
            events = await SqliteEventLog.open(db, MemoryBroker(), retention=settings.event_retention)
            closers.append(events.close)
    return _Storage(store, events)


def _stop_server(server: Any) -> None:
    server.shutdown()
    server.server_close()


async def _stop(job: asyncio.Task[None]) -> None:
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job
