"""Traces over real sockets: the server exports its spans to a fake OTLP/HTTP collector in this process, and the tree
of a task (request → invoke_agent → iterations → model and tool calls) continues the caller's ``traceparent``.

The collector decodes what the OpenTelemetry SDK really sends (``POST /v1/traces``, protobuf, maybe gzip) and
answers like a real receiver; the servers flush their batches every 100 ms (``OTEL_BSP_SCHEDULE_DELAY``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from tests.integration.calls import STREAM_TIMEOUT, count_until_terminal, open_stream, submit, wait_finished
from tests.integration.scripts import scripted
from tests.integration.server import ServerProcess, auth, running

pytestmark = pytest.mark.integration

SERVER, INTERNAL, CLIENT = ProtoSpan.SPAN_KIND_SERVER, ProtoSpan.SPAN_KIND_INTERNAL, ProtoSpan.SPAN_KIND_CLIENT
ERROR = Status.STATUS_CODE_ERROR
HEX32 = re.compile(r"^[0-9a-f]{32}$")
FLUSH_MS = "100"
"""``OTEL_BSP_SCHEDULE_DELAY`` (read by the SDK itself): the servers send their spans this often, in ms."""
SETTLE_SECONDS = 0.5
"""Five export periods: what a server has not sent by then after its last span was there, it never sends."""
CONTENT_ATTRIBUTES = frozenset({"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.call.arguments",
                                "gen_ai.tool.call.result"})

TWO_ITERATIONS: list[dict[str, Any]] = [
    {"text": "Looking around first.", "tool_calls": [
        {"name": "list_files", "arguments": {"path": "."}},
        {"name": "file_read", "arguments": {"path": "no-such-file.txt"}},
    ]},
    {"text": "The workspace is empty and the file is missing."},
]
MODEL_ERROR = "server"
FAILING_MODEL: list[dict[str, Any]] = [{"text": "Hmm.", "error": {"kind": MODEL_ERROR, "message": "it fell over"}}]


def plain(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: plain(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def attributes(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    return {kv.key: plain(kv.value) for kv in pairs}


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    """Empty for a root span."""
    name: str
    kind: int
    attributes: dict[str, Any]
    status: int
    service: str


@dataclass(frozen=True)
class Export:
    path: str
    content_type: str


class Collector:
    """A fake OTLP/HTTP receiver on 127.0.0.1: keeps every request it got and the spans of ``POST /v1/traces``."""

    def __init__(self, port: int = 0) -> None:
        self.exports: list[Export] = []
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                export = Export(self.path, self.headers.get("Content-Type", ""))
                ok = export == Export("/v1/traces", "application/x-protobuf")
                collector.received(export, ExportTraceServiceRequest.FromString(body) if ok else None)
                reply = ExportTraceServiceResponse().SerializeToString() if ok else b""
                self.send_response(200 if ok else 415)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads what came, not a request log."""

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-collector", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def received(self, export: Export, request: ExportTraceServiceRequest | None) -> None:
        spans: list[Span] = []
        for resource_spans in request.resource_spans if request is not None else ():
            service = str(attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                spans.extend(Span(span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.name,
                                  span.kind, attributes(span.attributes), span.status.code, service)
                             for span in scope_spans.spans)
        with self._lock:
            self.exports.append(export)
            self._spans.extend(spans)

    def spans(self, trace_id: str | None = None) -> list[Span]:
        with self._lock:
            return [span for span in self._spans if trace_id is None or span.trace_id == trace_id]

    async def wait(self, trace_id: str, names: Mapping[str, int], *, settle: bool = True) -> list[Span]:
        """The trace's spans once it has at least ``names`` (name: count), and with ``settle`` a while later, so that
        spans that should not be there (a duplicate, a straggler) show too."""
        deadline = time.monotonic() + STREAM_TIMEOUT
        while True:
            have = Counter(span.name for span in self.spans(trace_id))
            if all(have[name] >= count for name, count in names.items()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"spans of {trace_id}: {dict(have)}, expected at least {dict(names)}")
            await asyncio.sleep(0.05)
        if settle:
            await asyncio.sleep(SETTLE_SECONDS)
        return self.spans(trace_id)

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def caller() -> tuple[str, str, dict[str, str]]:
    """A caller's trace id, span id, and its ``traceparent`` header (sampled)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, {"traceparent": f"00-{trace_id}-{span_id}-01"}


def only(spans: Sequence[Span], name: str) -> Span:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {[s.name for s in spans]}"
    return found[0]


async def stored_events(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/sessions/{session_id}/events", params={"limit": 500})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    assert events, "the session has no events"
    return events


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with Collector() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced_server(collector: Collector) -> Iterator[ServerProcess]:
    """Every task: list_files and file_read (a missing file: a tool error), then the answer. Only the scenario below
    runs here, so that every span this server sends is either that task's or a request's own."""
    with scripted(TWO_ITERATIONS, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_SERVICE_NAME="alex-traced",
                  OTEL_BSP_SCHEDULE_DELAY=FLUSH_MS) as process:
        yield process


@pytest.fixture(scope="module")
def content_server(collector: Collector) -> Iterator[ServerProcess]:
    """The default mock (list_files, or bash for ``$ command``, then the answer), with content on spans."""
    with running(OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY=FLUSH_MS,
                 ALEX_TRACE_CONTENT="true") as process:
        yield process


# The tree of a task


@dataclass(frozen=True)
class Traced:
    trace_id: str
    parent_id: str
    request_id: str
    session_id: str
    task: dict[str, Any]
    events: list[dict[str, Any]]
    spans: list[Span]
    service_spans: list[Span]
    """Every span the server sent by then, whichever trace."""


async def trace_task(server: ServerProcess, collector: Collector) -> Traced:
    trace_id, parent_id, headers = caller()
    headers["X-Request-ID"] = request_id = "req-" + secrets.token_hex(6)
    session_id = "traced-task"
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client:
        response = await client.post("/api/tasks", json={"task": "look around", "session_id": session_id},
                                     headers=headers)
        assert response.status_code == 202, response.text
        task = await wait_finished(client, response.json()["task_id"])
        events = await stored_events(client, session_id)
    spans = await collector.wait(trace_id, {"POST /api/tasks": 1, "invoke_agent": 1, "iteration": 2,
                                            "chat mock": 2, "execute_tool list_files": 1,
                                            "execute_tool file_read": 1})
    mine = [span for span in collector.spans() if span.service == "alex-traced"]
    return Traced(trace_id, parent_id, request_id, session_id, task, events, spans, mine)


@pytest.fixture(scope="module")
def traced(traced_server: ServerProcess, collector: Collector) -> Traced:
    return asyncio.run(trace_task(traced_server, collector))


def test_the_exports_are_otlp_protobuf_posts_to_v1_traces(traced: Traced, collector: Collector) -> None:
    assert collector.exports
    assert set(collector.exports) == {Export("/v1/traces", "application/x-protobuf")}


def test_the_request_span_continues_the_callers_trace(traced: Traced) -> None:
    post = only(traced.spans, "POST /api/tasks")
    assert (post.kind, post.trace_id, post.parent_id) == (SERVER, traced.trace_id, traced.parent_id)
    assert post.attributes["http.route"] == "/api/tasks"
    assert post.attributes["http.response.status_code"] == 202
    assert post.attributes["alex.request_id"] == traced.request_id
    assert post.service == "alex-traced"


def test_the_task_is_one_tree_under_the_request(traced: Traced) -> None:
    spans = traced.spans
    post, agent = only(spans, "POST /api/tasks"), only(spans, "invoke_agent")
    assert (agent.kind, agent.parent_id) == (INTERNAL, post.span_id)
    assert agent.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert agent.attributes["gen_ai.conversation.id"] == traced.session_id
    assert agent.attributes["alex.task.id"] == traced.task["task_id"]
    assert (agent.attributes["alex.task.outcome"], agent.attributes["alex.task.iterations"]) == ("completed", 2)
    iterations = {span.attributes["alex.iteration"]: span for span in spans if span.name == "iteration"}
    assert sorted(iterations) == [1, 2]
    assert {(span.kind, span.parent_id) for span in iterations.values()} == {(INTERNAL, agent.span_id)}
    chats = {span.parent_id: span for span in spans if span.name == "chat mock"}
    assert set(chats) == {iterations[1].span_id, iterations[2].span_id}, "one model call per iteration"
    tools = [span for span in spans if span.name.startswith("execute_tool ")]
    assert [(t.kind, t.parent_id) for t in tools] == [(INTERNAL, iterations[1].span_id)] * 2
    assert len(spans) == 8, sorted(span.name for span in spans)


def test_every_span_of_the_task_and_its_events_carry_the_callers_trace_id(traced: Traced) -> None:
    assert traced.task["trace_id"] == traced.trace_id
    assert {event["trace_id"] for event in traced.events} == {traced.trace_id}
    # The server's other spans are the requests' own (readiness checks, polls of the task), each its own trace.
    others = [span for span in traced.service_spans if span.trace_id != traced.trace_id]
    assert others
    assert {(span.kind, span.parent_id) for span in others} == {(SERVER, "")}
    assert {span.name for span in others} <= {"GET /api/tasks/{task_id}", "GET /api/sessions/{session_id}/events"}


def test_model_calls_carry_the_genai_attributes_and_the_tasks_usage(traced: Traced) -> None:
    chats = sorted((span for span in traced.spans if span.name == "chat mock"),
                   key=lambda span: span.attributes["gen_ai.response.finish_reasons"] != ["tool_calls"])
    assert [span.kind for span in chats] == [CLIENT, CLIENT]
    for span in chats:
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.request.model"] == "mock"
        assert span.attributes["gen_ai.provider.name"] == "mock"
        assert isinstance(span.attributes["gen_ai.response.time_to_first_chunk"], float)
        assert span.attributes["gen_ai.response.time_to_first_chunk"] >= 0
    assert [span.attributes["gen_ai.response.finish_reasons"] for span in chats] == [["tool_calls"], ["stop"]]
    usage = traced.task["usage"]
    assert sum(span.attributes["gen_ai.usage.input_tokens"] for span in chats) == usage["prompt_tokens"]
    assert sum(span.attributes["gen_ai.usage.output_tokens"] for span in chats) == usage["completion_tokens"]


def test_tool_calls_carry_their_name_and_call_id_and_a_tool_error(traced: Traced) -> None:
    started = {event["tool_name"]: event["call_id"] for event in traced.events
               if event["event_type"] == "tool_call_start"}
    for name in ("list_files", "file_read"):
        span = only(traced.spans, f"execute_tool {name}")
        assert span.attributes["gen_ai.tool.name"] == name
        assert span.attributes["gen_ai.tool.call.id"] == started[name]
    failed = only(traced.spans, "execute_tool file_read")
    assert (failed.attributes.get("error.type"), failed.status) == ("tool_error", ERROR)
    assert "error.type" not in only(traced.spans, "execute_tool list_files").attributes


def test_no_content_goes_on_spans_by_default(traced: Traced) -> None:
    assert [(span.name, key) for span in traced.spans for key in span.attributes if key in CONTENT_ATTRIBUTES] == []


# Content, failures, cancels


async def test_with_trace_content_the_messages_and_arguments_go_on_spans(
        content_server: ServerProcess, collector: Collector) -> None:
    trace_id, _, headers = caller()
    text = "what is in the workspace? marker-5b1e"
    async with httpx.AsyncClient(base_url=content_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        response = await client.post("/api/tasks", json={"task": text, "session_id": "traced-content"},
                                     headers=headers)
        assert response.status_code == 202, response.text
        task = await wait_finished(client, response.json()["task_id"])
    assert task["status"] == "completed", task
    spans = await collector.wait(trace_id, {"invoke_agent": 1, "chat mock": 2, "execute_tool list_files": 1})
    agent = only(spans, "invoke_agent")
    assert json.loads(agent.attributes["gen_ai.input.messages"]) == [{"role": "user", "content": text}]
    for chat in (span for span in spans if span.name == "chat mock"):
        assert text in chat.attributes["gen_ai.input.messages"]
        assert json.loads(chat.attributes["gen_ai.output.messages"])[0]["role"] == "assistant"
    tool = only(spans, "execute_tool list_files")
    assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"path": "."}
    assert "gen_ai.tool.call.result" in tool.attributes


async def test_a_cancelled_task_ends_its_agent_span_as_cancelled(
        content_server: ServerProcess, collector: Collector) -> None:
    trace_id, _, headers = caller()
    session_id = "traced-cancel"
    async with (
        httpx.AsyncClient(base_url=content_server.base_url, headers=auth("alice"), timeout=10.0) as client,
        open_stream(client, session_id) as messages,
    ):
        response = await client.post("/api/tasks", json={"task": "$ sleep 30", "session_id": session_id},
                                     headers=headers)
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]
        async with asyncio.timeout(STREAM_TIMEOUT):
            async for message in messages:
                if message.event == "tool_call_start":
                    break
        cancelled = await client.post(f"/api/tasks/{task_id}/cancel")
        assert cancelled.status_code == 202, cancelled.text
        task = await wait_finished(client, task_id)
    assert task["status"] == "cancelled", task
    spans = await collector.wait(trace_id, {"invoke_agent": 1, "execute_tool bash": 1})
    agent = only(spans, "invoke_agent")
    assert (agent.attributes.get("error.type"), agent.status) == ("cancelled", ERROR)
    tool = only(spans, "execute_tool bash")
    assert (tool.attributes.get("error.type"), tool.status) == ("cancelled", ERROR)


async def test_a_model_error_ends_the_chat_span_with_its_kind(collector: Collector) -> None:
    trace_id, _, headers = caller()
    with scripted(FAILING_MODEL, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY=FLUSH_MS) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client:
            response = await client.post("/api/tasks", json={"task": "think", "session_id": "traced-model-error"},
                                         headers=headers)
            assert response.status_code == 202, response.text
            task = await wait_finished(client, response.json()["task_id"])
        assert task["status"] == "failed", task
        spans = await collector.wait(trace_id, {"invoke_agent": 1, "chat mock": 1})
    chat = only(spans, "chat mock")
    assert (chat.attributes.get("error.type"), chat.status) == (MODEL_ERROR, ERROR)
    assert "gen_ai.usage.input_tokens" not in chat.attributes
    agent = only(spans, "invoke_agent")
    assert agent.status == ERROR
    assert MODEL_ERROR in agent.attributes["error.type"]


# Requests


async def test_a_stream_is_one_server_span_however_many_events_it_carries(
        content_server: ServerProcess, collector: Collector) -> None:
    trace_id, parent_id, headers = caller()
    session_id = "traced-stream"
    async with httpx.AsyncClient(base_url=content_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        async with open_stream(client, session_id, headers=headers) as messages:
            task_id = await submit(client, "look around", session_id)
            received = await count_until_terminal(messages)
        # Submitted without a traceparent: the task has its own trace, not the stream's.
        assert (await client.get(f"/api/tasks/{task_id}")).json()["trace_id"] != trace_id
    assert received > 5
    spans = await collector.wait(trace_id, {"GET /api/sse": 1})
    assert [(span.name, span.kind, span.parent_id) for span in spans] == [("GET /api/sse", SERVER, parent_id)]
    assert spans[0].attributes["http.response.status_code"] == 200


async def test_without_a_traceparent_a_task_starts_its_own_trace(
        content_server: ServerProcess, collector: Collector) -> None:
    session_id = "traced-new-trace"
    async with httpx.AsyncClient(base_url=content_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        task = await wait_finished(client, await submit(client, "look around", session_id))
        events = await stored_events(client, session_id)
    trace_id = task["trace_id"]
    assert HEX32.match(trace_id), trace_id
    assert {event["trace_id"] for event in events} == {trace_id}
    spans = await collector.wait(trace_id, {"POST /api/tasks": 1, "invoke_agent": 1})
    post = only(spans, "POST /api/tasks")
    assert post.parent_id == ""
    assert only(spans, "invoke_agent").parent_id == post.span_id


async def test_probes_and_scrapes_make_no_span(content_server: ServerProcess, collector: Collector) -> None:
    trace_id, _, headers = caller()
    async with httpx.AsyncClient(base_url=content_server.base_url, timeout=10.0, headers=headers) as client:
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        # A traced request after them, in the same trace: once it arrived, theirs would have too.
        assert (await client.get("/api/sessions", headers=auth("alice"))).status_code == 200
    spans = await collector.wait(trace_id, {"GET /api/sessions": 1})
    assert [span.name for span in spans] == ["GET /api/sessions"]


async def test_a_request_is_one_span_where_fastapi_would_trace_it_too(collector: Collector) -> None:
    """``FASTAPI_OTEL_AUTO_CONFIGURE`` would have FastAPI set up global providers and trace every request itself
    (a second server span, seen before FastAPI's instrumentation was turned off); the service's own span stays the
    only one."""
    trace_id, parent_id, headers = caller()
    with running(OTEL_EXPORTER_OTLP_ENDPOINT=collector.url, OTEL_BSP_SCHEDULE_DELAY=FLUSH_MS,
                 OTEL_SERVICE_NAME="alex-fastapi-auto", FASTAPI_OTEL_AUTO_CONFIGURE="true") as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as client:
            response = await client.get("/api/sessions", headers={**headers, **auth("alice")})
            assert response.status_code == 200, response.text
        spans = await collector.wait(trace_id, {"GET /api/sessions": 1})
    assert [(span.name, span.kind, span.parent_id) for span in spans] == [("GET /api/sessions", SERVER, parent_id)]


MALFORMED = [
    pytest.param("not a traceparent", id="garbage"),
    pytest.param("ff-{trace}-{span}-01", id="version ff"),
    pytest.param("00-{trace}-{span}-01-extra", id="version 00 with more"),
    pytest.param("00-{upper}-{span}-01", id="upper case"),
    pytest.param("00-00000000000000000000000000000000-{span}-01", id="zero trace id"),
    pytest.param("00-{trace}-0000000000000000-01", id="zero span id"),
    pytest.param("00-{trace}-{span}", id="no flags"),
]


@pytest.mark.parametrize("template", MALFORMED)
async def test_a_malformed_traceparent_is_ignored(
        content_server: ServerProcess, collector: Collector, template: str) -> None:
    trace_hex, span_hex = secrets.token_hex(16), secrets.token_hex(8)
    header = template.format(trace=trace_hex, span=span_hex, upper=trace_hex.upper())
    session_id = "traced-malformed-" + secrets.token_hex(4)
    async with httpx.AsyncClient(base_url=content_server.base_url, headers=auth("alice"), timeout=10.0) as client:
        response = await client.post("/api/tasks", json={"task": "look around", "session_id": session_id},
                                     headers={"traceparent": header})
        assert response.status_code == 202, response.text
        task = await wait_finished(client, response.json()["task_id"])
    trace_id = task["trace_id"]
    assert HEX32.match(trace_id), trace_id
    assert trace_id != trace_hex
    post = only(await collector.wait(trace_id, {"POST /api/tasks": 1}, settle=False), "POST /api/tasks")
    assert post.parent_id == ""


# No exporter


@contextlib.contextmanager
def collector_on_the_sdk_default_port() -> Iterator[Collector]:
    """A collector where an exporter built without an endpoint would send (the SDK's default, port 4318), so that
    a server exporting when it should not is seen; skipped when something else holds the port."""
    try:
        receiver = Collector(4318)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            pytest.skip("port 4318 (the OTLP/HTTP default) is taken on this machine")
        raise
    with receiver:
        yield receiver


async def test_without_an_endpoint_nothing_is_exported_and_events_still_carry_trace_ids() -> None:
    trace_id, _, headers = caller()
    session_id = "untraced"
    with collector_on_the_sdk_default_port() as receiver, running(OTEL_BSP_SCHEDULE_DELAY=FLUSH_MS) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client:
            response = await client.post("/api/tasks", json={"task": "look around", "session_id": session_id},
                                         headers=headers)
            assert response.status_code == 202, response.text
            task = await wait_finished(client, response.json()["task_id"])
            plain_task = await wait_finished(client, await submit(client, "look again", session_id))
            events = await stored_events(client, session_id)
        await asyncio.sleep(1.0)
        assert receiver.exports == []
    assert task["status"] == "completed", task
    assert task["trace_id"] == trace_id, "an unexported trace is still continued"
    assert HEX32.match(plain_task["trace_id"]), plain_task
    assert plain_task["trace_id"] != trace_id
    assert {event["trace_id"] for event in events} == {trace_id, plain_task["trace_id"]}
