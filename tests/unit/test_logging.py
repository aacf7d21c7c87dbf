"""The service's log lines: written straight to the stream, with the very fields the standard library's pipeline
gave them (the reference below is that pipeline, built as the service built it before), at the configured level,
and with other libraries' stdlib lines in the same format."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from service.observability.logging import _redact, add_trace_ids, configure_logging

Emit = Callable[[Any], None]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    structlog.contextvars.clear_contextvars()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        logging.getLogger("uvicorn.access").disabled = False


def configure_reference(stream: io.StringIO, level: str) -> None:
    """The stdlib route of earlier versions: structlog -> ``logging.Logger`` -> handler -> ``ProcessorFormatter``."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for record in records:
        assert record.pop("timestamp").endswith("Z")
    return records


def log_a_bit() -> None:
    """Every kind of line the service writes: plain, with context, redacted, in a span, with an exception, filtered
    out, and from a stdlib logger of another library."""
    log = structlog.get_logger("service.runner")
    log.info("task_started", task_id="t_1", seconds=0.25, flags=["a"], nested={"k": 1})
    structlog.contextvars.bind_contextvars(request_id="r_1", subject="alice")
    log.warning("task_queue_unavailable", error="boom", Authorization="Bearer x", api_key="k")
    with TracerProvider().get_tracer("test").start_as_current_span("iteration"):
        log.info("inside_a_span")
    try:
        raise ValueError("bad value")
    except ValueError:
        log.exception("task_crashed", task_id="t_2")
    log.error("task_not_saved", task_id="t_3")
    log.debug("too_fine")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    logging.getLogger("uvicorn.error").debug("not shown")
    structlog.contextvars.clear_contextvars()


def test_service_lines_carry_the_same_fields_as_through_the_stdlib_pipeline() -> None:
    reference = io.StringIO()
    configure_reference(reference, "info")
    log_a_bit()
    expected = without_time(lines(reference))

    direct = io.StringIO()
    configure_logging("json", "info", direct)
    log_a_bit()
    written = without_time(lines(direct))

    for record in written:
        if "exception" in record:  # the traceback names this test's lines, which moved: compare its shape
            assert record["exception"].startswith("Traceback (most recent call last):")
            assert record["exception"].endswith("ValueError: bad value")
    for record in (*written, *expected):
        record.pop("exception", None)
        if "trace_id" in record:
            assert len(record.pop("trace_id")) == 32
            assert len(record.pop("span_id")) == 16
    assert written == expected
    assert [(r["event"], r["level"], r["logger"]) for r in written] == [
        ("task_started", "info", "service.runner"),
        ("task_queue_unavailable", "warning", "service.runner"),
        ("inside_a_span", "info", "service.runner"),
        ("task_crashed", "error", "service.runner"),
        ("task_not_saved", "error", "service.runner"),
        ("Started server process [42]", "info", "uvicorn.error"),
    ]
    assert written[1]["Authorization"] == "[redacted]"
    assert written[1]["api_key"] == "[redacted]"
    assert written[1]["request_id"] == "r_1"


def test_the_level_filters_service_and_library_lines_alike() -> None:
    stream = io.StringIO()
    configure_logging("json", "warning", stream)
    log = structlog.get_logger("service.api")
    log.info("request_finished")
    log.warning("rate_limit_storage_failed")
    logging.getLogger("uvicorn.error").info("Waiting for application startup.")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    assert [(r["event"], r["level"]) for r in lines(stream)] == [
        ("rate_limit_storage_failed", "warning"), ("Invalid HTTP request received.", "warning")]


def test_lines_written_from_many_threads_never_interleave() -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    log = structlog.get_logger("service.sqlite")
    library = logging.getLogger("some.library")

    def write(number: int) -> None:
        for index in range(200):
            log.info("written", thread=number, index=index, padding="x" * 200)
            library.info("library line %d", index)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = lines(stream)
    assert len(records) == 4 * 200 * 2
    assert sum(1 for r in records if r["event"] == "written") == 800


def test_a_stream_that_fails_does_not_fail_the_caller() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("the pipe is gone")

    configure_logging("json", "info", Broken())
    structlog.get_logger("service.runner").info("task_finished")


def test_the_console_format_renders_on_the_same_stream() -> None:
    stream = io.StringIO()
    configure_logging("console", "info", stream)
    structlog.get_logger("service.cli").info("server_started", port=8080)
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    text = stream.getvalue()
    for part in ("server_started", "port=8080", "[service.cli]"):
        assert part in text
    assert "Application startup complete." in text
