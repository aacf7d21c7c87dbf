"""structlog, configured once at start: JSON in production, readable on a terminal; stdlib logs (uvicorn's too)
come out in the same format on the same stream. Context (request, subject, session, task ids) travels in
contextvars; the trace and span ids are those of the OpenTelemetry span current where the line is written (also a
contextvar).

The service's own lines skip the standard library's machinery: a structlog logger filters by level itself, runs
the processors and writes the rendered line to the stream, without a ``logging.Logger``, a ``LogRecord``, a handler
and a formatter in between (about half the cost of a line, and the service writes several per task). Lines from
other libraries' stdlib loggers still go through a ``logging`` handler whose formatter runs the very same
processors, so both kinds of line carry the same fields, and both take the handler's lock, so lines never
interleave.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from service.observability.tracing import format_span_id, format_trace_id

_REDACTED_KEYS = frozenset({"authorization", "access_token", "token", "api_key", "openai_api_key", "jwt_secret",
                            "cookie", "password", "secret"})


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in list(event_dict):
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def add_trace_ids(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event_dict.setdefault("trace_id", format_trace_id(span_context.trace_id))
        event_dict.setdefault("span_id", format_span_id(span_context.span_id))
    return event_dict


class LineWriter:
    """The last link of a structlog chain: writes each rendered line, whole, to a stream.

    ``name`` is the logger's name (``add_logger_name`` reads it). A line that cannot be written is dropped, as a
    ``logging.StreamHandler`` would drop it: logging never fails the code that logs.
    """

    __slots__ = ("_lock", "_stream", "name")

    def __init__(self, name: str, stream: TextIO, lock: threading.RLock) -> None:
        self.name = name
        self._stream = stream
        self._lock = lock

    def msg(self, line: str) -> None:
        try:
            with self._lock:
                self._stream.write(line + "\n")
                self._stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: S110 -- see the class docstring
            pass

    debug = info = warning = warn = error = critical = fatal = exception = msg


class LineWriterFactory:
    """structlog's logger factory for :class:`LineWriter`: ``structlog.get_logger(name)`` gets one named ``name``."""

    def __init__(self, stream: TextIO, lock: threading.RLock) -> None:
        self._stream = stream
        self._lock = lock

    def __call__(self, *args: Any) -> LineWriter:
        name = args[0] if args and isinstance(args[0], str) else "root"
        return LineWriter(name, self._stream, self._lock)


def configure_logging(log_format: str, level: str, stream: TextIO | None = None) -> None:
    """Route structlog and the standard library's logging to ``stream`` (stderr) in one format. Call once per
    process."""
    out = sys.stderr if stream is None else stream
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    lock = handler.lock
    assert lock is not None  # every Handler makes its lock in __init__
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=LineWriterFactory(out, lock),
        wrapper_class=structlog.make_filtering_bound_logger(root.getEffectiveLevel()),
        cache_logger_on_first_use=True,
    )
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # The access log is ours (service.api.access), with tokens taken out of query strings.
    logging.getLogger("uvicorn.access").disabled = True
