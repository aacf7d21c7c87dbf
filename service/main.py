"""``create_app(settings)``: the FastAPI application with a lifespan that builds and closes the container.

Nothing is configured at import time. ``service.cli`` runs it under uvicorn with the drain hook.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import APIRouter, FastAPI
from opentelemetry.sdk.trace import TracerProvider
from starlette.middleware.cors import CORSMiddleware

from service import __version__
from service.api.deps import install_security_schema
from service.api.headers import SecurityHeaders
from service.api.limits import BodySizeLimit
from service.api.problems import install_problem_handlers, install_problem_schema
from service.api.ratelimit import RateLimitHeaders, RateLimits
from service.api.routes import health, sessions, stream, tasks, ui, ui_auth
from service.api.routes import metrics as metrics_route
from service.api.telemetry import RequestTelemetry
from service.config import Settings
from service.container import Container, build_container
from service.observability.metrics import Metrics
from service.observability.tracing import TRACER_NAME, build_tracer_provider
from service.web import WebAssets

log = structlog.get_logger("service.main")


def create_app(settings: Settings, *, metrics: Metrics | None = None,
               tracer_provider: TracerProvider | None = None, **overrides: Any) -> FastAPI:
    """The application; ``overrides`` go to :func:`build_container` (tests pass fakes there, and may pass the
    metrics and the tracer provider to read what the application records)."""
    app_metrics = metrics if metrics is not None else Metrics()
    provider = tracer_provider if tracer_provider is not None else build_tracer_provider(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        container = await build_container(settings, metrics=app_metrics, tracer_provider=provider, **overrides)
        app.state.container = container
        try:
            await container.runner.recover()
            await container.runner.start()
            _announce(settings, container)
            container.ready = True
            yield
        finally:
            await container.close()
            log.info("server_stopped")

    app = FastAPI(
        title="alex-server",
        version=__version__,
        summary="Runs AI-agent tasks and streams every step over Server-Sent Events.",
        lifespan=lifespan,
        # The interactive docs load their scripts from a CDN: useless in an air-gapped cluster and at odds with
        # the API's content security policy. The OpenAPI document itself stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
        # Requests are traced, counted and logged once, by RequestTelemetry. FastAPI's own instrumentation would
        # do it again as soon as a global tracer or meter provider exists (opentelemetry-instrument, or
        # FASTAPI_OTEL_AUTO_CONFIGURE), and otherwise still looks the providers up on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.rate_limits = RateLimits(settings)
    app.state.web = WebAssets()
    install_problem_handlers(app)
    # Routes are matched in this order: the busiest (submissions and streams) early.
    routers = [health.router, tasks.router, stream.router, sessions.router, ui.router, ui_auth.router]
    if settings.metrics_enabled and settings.metrics_port is None:
        routers.append(metrics_route.metrics_router(settings.metrics_path))
    for router in routers:
        app.include_router(router)
    install_problem_schema(app)
    install_security_schema(app, routers)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=True,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Request-ID"],
        expose_headers=["X-Request-ID", "Retry-After", "Location", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                        "X-RateLimit-Reset"],
    )
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestTelemetry, metrics=app_metrics, tracer=provider.get_tracer(TRACER_NAME, __version__),
                       untraced=frozenset({"/health", "/ready", settings.metrics_path}))
    app_metrics.prepare_routes(_route_templates(routers))
    return app


def _route_templates(routers: list[APIRouter]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for route in (route for router in routers for route in router.routes):
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(path, str) and methods:
            found.extend((method, path) for method in sorted(methods) if method != "HEAD")
    return found


def _announce(settings: Settings, container: Container) -> None:
    log.info(
        "server_ready",
        version=__version__,
        provider=settings.provider,
        model=container.chat_model.model,
        data_dir=str(settings.data_dir),
        auth="enabled" if settings.auth_enabled else "disabled",
    )
    sandbox = container.sandbox
    if sandbox is not None:
        log.info("bash_sandbox", bwrap=sandbox.bwrap is not None, user=sandbox.user, limits=sandbox.prlimit is not None)
        if sandbox.bwrap is None:
            log.warning("bash_sandbox_weak", reason="bwrap (bubblewrap) not found: commands share the server's "
                        "network and filesystem view (docs/security.md)")
    if settings.provider == "mock" and settings.llm_provider is None:
        log.warning("llm_mock_provider", reason="OPENAI_API_KEY is not set; answers come from the offline mock model")
    if not settings.auth_enabled:
        log.warning("auth_disabled", reason="ALEX_AUTH=disabled: every request is trusted; never do this in production")
    elif container.signing_key is not None and container.signing_key.generated:
        log.info("jwt_secret_from_data_dir", path=str(settings.generated_secret_path),
                 hint="mint a token with: alex-server token --sub NAME")
