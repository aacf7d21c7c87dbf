"""All configuration, in one Settings class read from the environment once and passed in.

Nothing else in the service reads ``os.environ``. A bad value stops the start with one line naming the variable
(:func:`load_settings`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_RATE = re.compile(r"^\s*\d+\s*(/|\s+per\s+)\s*(\d+\s+)?(second|minute|hour|day)s?\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """A configuration value is wrong; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ALEX_", extra="ignore", validate_default=True, frozen=True, populate_by_name=True
    )

    # The model
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("OPENAI_API_KEY"))
    llm_provider: Literal["openai", "mock"] | None = None
    """None means: ``openai`` when a key is set, else ``mock`` (resolved below)."""
    llm_model: str = "gpt-4o"
    base_url: str | None = None
    llm_timeout_seconds: float = Field(default=120.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0, le=10)
    mock_delay_ms: float = Field(default=15.0, ge=0)
    mock_script: Path | None = None

    # The engine
    max_iterations: int = Field(default=20, ge=1, le=1000)
    context_tokens: int = Field(default=100_000, ge=1_000)
    """The budget the conversation is trimmed to, oldest turns first, before every model turn."""
    task_analysis: bool = True
    system_prompt: str | None = None
    max_task_chars: int = Field(default=32_000, ge=1)

    # Tools
    bash_timeout_seconds: float = Field(default=60.0, gt=0)
    tool_output_limit_bytes: int = Field(default=64 * 1024, ge=1024)
    disabled_tools: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The bash sandbox (docs/security.md)
    sandbox_bwrap: Literal["auto", "on", "off"] = "auto"
    """``auto``: run bash inside bubblewrap when ``bwrap`` is installed; ``on``: refuse to start without it."""
    sandbox_user: str = "auto"
    """``uid:gid`` bash runs as; ``auto``: 65534:65534 (nobody) when the server runs as root, else the server's own;
    ``none``: the server's own."""
    sandbox_cpu_seconds: int = Field(default=120, ge=1)
    sandbox_memory_mb: int = Field(default=2048, ge=64)
    sandbox_file_size_mb: int = Field(default=1024, ge=1)
    sandbox_max_processes: int = Field(default=256, ge=8)
    sandbox_max_open_files: int = Field(default=1024, ge=16)

    # The server
    port: int = Field(default=8080, ge=0, le=65535, validation_alias=AliasChoices("PORT"))
    host: str = "127.0.0.1"
    data_dir: Path = Path(".alex")
    redis_url: str | None = None
    """Several replicas: events, sessions, tasks, the task queue and the limits live in this Redis."""
    replica_id: str | None = None
    """This replica's name in Redis (leases, consumer group); default: the host name and process id."""
    worker_concurrency: int = Field(default=32, ge=1, le=1000)
    """Tasks this replica runs at once; with Redis the rest wait in the shared queue for any replica. A task mostly
    waits for its model, so a replica runs many: at 50 submissions/s of half-second tasks about 25 run at once."""
    task_lease_seconds: float = Field(default=15.0, ge=1.0, le=3600.0)
    """With Redis: a task whose replica has not renewed its lease for this long is marked interrupted."""
    redis_event_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    """With Redis: a session's events expire this long after its last event (besides ALEX_EVENT_RETENTION)."""
    redis_outage_buffer_events: int = Field(default=10_000, ge=0)
    """With Redis: events a replica holds for its running tasks while Redis is down; past it those tasks fail."""
    redis_max_connections: int = Field(default=100, ge=4, le=10_000)
    """With Redis: connections of this replica's shared pool (two blocking readers have their own); a command that
    finds them all busy waits for one, up to 5 s, then fails as if Redis were unreachable."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """How long running tasks may go on after SIGTERM before they are cancelled and stored as interrupted."""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)

    # Streams and events
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0)
    sse_buffer_size: int = Field(default=100, ge=1)
    event_retention: int = Field(default=10_000, ge=100)
    """Events kept per session; older ones are trimmed (see docs/operations.md)."""

    # Limits
    rate_limit_tasks: str = "10/minute"
    rate_limit_default: str = "120/minute"
    max_streams_per_client: int = Field(default=20, ge=1)
    max_streams: int = Field(default=10_000, ge=1)
    """Event streams this process holds at once, all clients together; more get 503 (go to another replica)."""
    max_tasks_per_client: int = Field(default=4, ge=1)
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://localhost:3000", "http://localhost:3001"]
    )

    # Auth
    auth: Literal["enabled", "disabled"] = "enabled"
    jwt_secret: SecretStr | None = None
    jwt_public_key: str | None = None
    """A PEM public key (RS*, PS*, ES*, EdDSA tokens); or its file in ``ALEX_JWT_PUBLIC_KEY_FILE``."""
    jwt_public_key_file: Path | None = None
    jwt_jwks_url: str | None = None
    jwt_jwks_cache_seconds: float = Field(default=600.0, gt=0)
    jwt_jwks_min_refresh_seconds: float = Field(default=10.0, ge=0)
    """The key set is fetched at most this often, whatever ``kid`` the tokens name."""
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = Field(default=30.0, ge=0, le=600)
    """Clock skew allowed on ``exp``, ``nbf`` and ``iat``."""

    # Metrics and traces (docs/operations.md). The OTEL_* names are OpenTelemetry's own.
    metrics_enabled: bool = True
    """Serve the Prometheus metrics (text format, no token: keep them inside the cluster)."""
    metrics_path: str = Field(default="/metrics", pattern=r"^/[A-Za-z0-9._/-]*$")
    """Where the metrics are served on the main port."""
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """Serve the metrics on this port of ``ALEX_HOST`` instead of the main one (any path answers there)."""
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT"))
    """Base URL of an OTLP/HTTP receiver (``/v1/traces`` is added); unset: no span leaves the process."""
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    """The full traces URL; wins over ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    otel_service_name: str = Field(default="alex-server", min_length=1,
                                   validation_alias=AliasChoices("OTEL_SERVICE_NAME"))
    otel_traces_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of new traces (no sampled parent) that are recorded; a caller's ``traceparent`` decision wins."""
    trace_content: bool = Field(
        default=False,
        validation_alias=AliasChoices("ALEX_TRACE_CONTENT", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"),
    )
    """Put the messages, the answer and the tool arguments on spans (they may hold personal data)."""

    # Logs
    log_format: Literal["console", "json"] | None = None
    """None means: ``console`` on a terminal, else ``json``."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("metrics_path")
    @classmethod
    def _metrics_path(cls, value: str) -> str:
        if value == "/" or value.startswith(("/api/", "/health", "/ready")) or value == "/api":
            raise ValueError("must not be /, /health, /ready or under /api")
        return value

    @model_validator(mode="after")
    def _metrics_port_apart(self) -> Settings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("ALEX_METRICS_PORT: must differ from PORT (unset it to serve the metrics on PORT)")
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.match(r"^(redis|rediss|unix)://", value.strip()):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        return value.strip()

    @field_validator("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.match(r"^https?://[^/\s]+", value.strip()):
            raise ValueError("expected an http:// or https:// URL of an OTLP/HTTP receiver")
        return value.strip()

    @property
    def otlp_traces_url(self) -> str | None:
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        if self.otel_exporter_otlp_endpoint:
            return self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

    @field_validator("cors_origins", "disabled_tools", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # HS256 wants a key at least as long as its hash (RFC 7518 §3.2).
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (e.g. openssl rand -base64 48)")
        return value

    @field_validator("sandbox_user")
    @classmethod
    def _uid_gid(cls, value: str) -> str:
        if value in ("auto", "none") or re.fullmatch(r"\d+:\d+", value):
            return value
        raise ValueError("expected uid:gid (numbers), auto or none")

    @field_validator("log_level", "llm_provider", "log_format", "auth", "sandbox_bwrap", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("rate_limit_tasks", "rate_limit_default")
    @classmethod
    def _rate(cls, value: str) -> str:
        if not _RATE.match(value):
            raise ValueError("expected a rate like 10/minute or 100 per hour")
        return value

    @model_validator(mode="after")
    def _provider_needs_key(self) -> Settings:
        if self.llm_provider == "openai" and self.openai_api_key is None and self.base_url is None:
            raise ValueError("ALEX_LLM_PROVIDER: openai needs OPENAI_API_KEY (or ALEX_BASE_URL for a keyless server)")
        return self

    @model_validator(mode="after")
    def _one_key_source(self) -> Settings:
        given = [name for name, value in (("ALEX_JWT_SECRET", self.jwt_secret),
                                          ("ALEX_JWT_PUBLIC_KEY", self.jwt_public_key),
                                          ("ALEX_JWT_PUBLIC_KEY_FILE", self.jwt_public_key_file),
                                          ("ALEX_JWT_JWKS_URL", self.jwt_jwks_url)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: set only one of {', '.join(given)}")
        if self.jwt_jwks_url is not None and not self.jwt_jwks_url.startswith(("https://", "http://")):
            raise ValueError("ALEX_JWT_JWKS_URL: expected an http(s) URL")
        if self.jwt_public_key_file is not None:
            try:
                self.jwt_public_key_file.read_text()
            except OSError as exc:
                raise ValueError(f"ALEX_JWT_PUBLIC_KEY_FILE: cannot read it ({exc.strerror})") from None
        return self

    @property
    def public_key_pem(self) -> str | None:
        if self.jwt_public_key_file is not None:
            return self.jwt_public_key_file.read_text()
        return self.jwt_public_key

    @property
    def provider(self) -> Literal["openai", "mock"]:
        if self.llm_provider is not None:
            return self.llm_provider
        return "openai" if self.openai_api_key is not None else "mock"

    @property
    def resolved_log_format(self) -> Literal["console", "json"]:
        if self.log_format is not None:
            return self.log_format
        return "console" if sys.stderr.isatty() else "json"

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "enabled"

    @property
    def workspaces_dir(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "alex.db"

    @property
    def generated_secret_path(self) -> Path:
        return self.data_dir / "jwt_secret"


_SECRET_FIELDS = frozenset({"openai_api_key", "jwt_secret", "OPENAI_API_KEY", "redis_url"})
_ENV_NAMES = {
    "openai_api_key": "OPENAI_API_KEY",
    "port": "PORT",
    "otel_exporter_otlp_endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
    "otel_exporter_otlp_traces_endpoint": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "otel_service_name": "OTEL_SERVICE_NAME",
}


def env_name(field_name: str) -> str:
    """The variable that sets a field (errors may name the field or, for aliased ones, the variable itself)."""
    if field_name.isupper():
        return field_name
    return _ENV_NAMES.get(field_name, "ALEX_" + field_name.upper())


def load_settings(**overrides: Any) -> Settings:
    """Read the environment once; raise :class:`ConfigError` with one line naming the first bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if isinstance(part, str)]
        message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        if loc:
            raw = first.get("input")
            shown = f" (got {raw!r})" if isinstance(raw, str | int | float) and loc[0] not in _SECRET_FIELDS else ""
            raise ConfigError(f"{env_name(loc[0])}: {message}{shown}") from None
        raise ConfigError(message) from None
