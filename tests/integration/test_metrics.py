"""``GET /metrics`` over real HTTP: a scripted task, its stream, a failing model, a cancel, refused tokens, rate
limits and the stream cap each move exactly the series they should, by exactly what happened.

Every check compares two scrapes (before and after) of the exposition, parsed with the client library's own parser;
the expected amounts come from what the client saw (events received, the task's usage), never from constants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import __version__
from service.tokens import mint_token
from tests.integration.calls import STREAM_TIMEOUT, TERMINAL, open_stream, submit, wait_finished
from tests.integration.scripts import scripted
from tests.integration.server import ALL_SCOPES, SECRET, ServerProcess, running, token

pytestmark = pytest.mark.integration

Labels = frozenset[tuple[str, str]]
Series = dict[tuple[str, Labels], float]

CHAT = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "mock", "gen_ai_request_model": "mock"}

THREE_ITERATIONS: list[dict[str, Any]] = [
    {"text": "Looking around first.", "tool_calls": [
        {"name": "list_files", "arguments": {"path": "."}},
        {"name": "file_read", "arguments": {"path": "no-such-file.txt"}},
    ]},
    {"text": "Once more, to be sure.", "tool_calls": [{"name": "list_files", "arguments": {"path": "."}}]},
    {"text": "The workspace is empty and the file is missing."},
]
MODEL_ERROR = "rate_limit"
FAILING_MODEL: list[dict[str, Any]] = [
    {"text": "Let me think.", "error": {"kind": MODEL_ERROR, "message": "the model server answered 429"}},
]


def labels(**values: str) -> Labels:
    return frozenset(values.items())


def parse(text: str) -> Series:
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series


def value(series: Series, name: str, **values: str) -> float:
    key = (name, labels(**values))
    assert key in series, f"no series {name}{values}"
    return series[key]


class Delta:
    """What moved between two scrapes."""

    def __init__(self, before: Series, after: Series) -> None:
        self.before = before
        self.after = after

    def __call__(self, name: str, **values: str) -> float:
        """How far one series (which must exist) moved."""
        return value(self.after, name, **values) - self.before.get((name, labels(**values)), 0.0)

    def moved(self, name: str) -> dict[Labels, float]:
        """Every series of the sample ``name`` that moved, by its labels; the scrapes' own requests left out."""
        keys = {key for key in self.after.keys() | self.before.keys() if key[0] == name}
        changes = {key[1]: self.after.get(key, 0.0) - self.before.get(key, 0.0) for key in keys}
        return {k: v for k, v in changes.items() if v and ("route", "/metrics") not in k}


def connect(server: ServerProcess, subject: str | None = "alice") -> httpx.AsyncClient:
    """A client of ``server``, with a token of ``subject`` (none for ``None``: the scraper needs none)."""
    headers = {"Authorization": f"Bearer {token(subject)}"} if subject is not None else {}
    return httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=10.0)


async def scrape(scraper: httpx.AsyncClient) -> Series:
    response = await scraper.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def scrape_until(scraper: httpx.AsyncClient, done: Callable[[Series], bool]) -> Series:
    """Scrape until ``done`` holds, for what the server does just after the client saw its effect (count the last
    frame once written, notice a disconnect, count a task after its last event); returns the last scrape either
    way, for the assertions to judge."""
    deadline = time.monotonic() + STREAM_TIMEOUT
    while True:
        series = await scrape(scraper)
        if done(series) or time.monotonic() > deadline:
            return series
        await asyncio.sleep(0.02)


def streams_idle(series: Series) -> bool:
    return value(series, "alex_sse_connections_active") == 0


def stream_ended(moved: Delta) -> bool:
    """The request of a stream that closed is counted (just after the stream's own account of its end)."""
    return moved.moved("alex_http_requests_total").get(labels(method="GET", route="/api/sse", status="200"), 0) > 0


@dataclass(frozen=True)
class Frame:
    raw: bytes
    event: str
    data: dict[str, Any]


async def split_frames(chunks: AsyncIterator[bytes]) -> AsyncGenerator[Frame, None]:
    """The stream's frames as they came, bytes and all (the servers here send no heartbeat while a test reads)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            raw, _, buffer = buffer.partition(b"\n\n")
            fields = dict(line.split(": ", 1) for line in raw.decode().split("\n"))
            yield Frame(raw + b"\n\n", fields["event"], json.loads(fields["data"]))


@contextlib.asynccontextmanager
async def raw_stream(client: httpx.AsyncClient, session_id: str) -> AsyncIterator[AsyncGenerator[Frame, None]]:
    """The session's stream as raw frames, checked to open with ``connected``; yields the frames after it."""
    async with client.stream("GET", "/api/sse", params={"session_id": session_id},
                             headers={"Accept": "text/event-stream"},
                             timeout=httpx.Timeout(10.0, read=None)) as response:
        assert response.status_code == 200, await response.aread()
        frames = split_frames(response.aiter_bytes())
        try:
            async with asyncio.timeout(STREAM_TIMEOUT):
                first = await anext(frames)
            assert (first.event, first.data) == ("connected", {"session_id": session_id})
            yield frames
        finally:
            await frames.aclose()


async def until_terminal(frames: AsyncIterator[Frame]) -> list[Frame]:
    taken: list[Frame] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for frame in frames:
            taken.append(frame)
            if frame.event in TERMINAL:
                return taken
    raise AssertionError(f"the stream ended after {len(taken)} events")


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[ServerProcess]:
    """Every task: list_files and file_read (a missing file), then list_files, then the answer.

    Heartbeats once a minute, so that none is among the frames whose bytes are counted.
    """
    with scripted(THREE_ITERATIONS, ALEX_SSE_HEARTBEAT_SECONDS="60") as process:
        yield process


@pytest.fixture(scope="module")
def failing_server() -> Iterator[ServerProcess]:
    with scripted(FAILING_MODEL) as process:
        yield process


@pytest.fixture(scope="module")
def plain_server() -> Iterator[ServerProcess]:
    with running() as process:
        yield process


# A task and its stream


@dataclass(frozen=True)
class Observed:
    """Scrapes around one scripted task followed on a stream, and what the client saw."""

    before: Series
    during: Series
    """With the stream still open, once its every frame was counted."""
    after: Series
    """Once the stream closed and the server noticed."""
    counts: Counter[str]
    frame_bytes: int
    task: dict[str, Any]


async def observe_task(server: ServerProcess) -> Observed:
    session_id = "metrics-main"
    async with connect(server) as client, connect(server, None) as scraper:
        before = await scrape_until(scraper, streams_idle)
        async with raw_stream(client, session_id) as frames:
            task_id = await submit(client, "look around", session_id)
            received = await until_terminal(frames)
            counts = Counter(frame.event for frame in received)
            frame_bytes = sum(len(frame.raw) for frame in received)

            def all_counted(series: Series) -> bool:
                moved = Delta(before, series)
                return moved("alex_sse_bytes_sent_total") == frame_bytes and all(
                    moved("alex_sse_events_sent_total", event_type=kind) == n for kind, n in counts.items())

            during = await scrape_until(scraper, all_counted)

        def all_closed(series: Series) -> bool:
            moved = Delta(before, series)
            return (streams_idle(series) and moved("alex_sse_connections_closed_total", reason="client_gone") > 0
                    and moved("alex_tasks_finished_total", outcome="completed") > 0 and stream_ended(moved))

        after = await scrape_until(scraper, all_closed)
        task = await wait_finished(client, task_id)
    assert received[-1].event == "task_complete", received[-1]
    return Observed(before, during, after, counts, frame_bytes, task)


@pytest.fixture(scope="module")
def observed(scripted_server: ServerProcess) -> Observed:
    return asyncio.run(observe_task(scripted_server))


def test_the_script_played_as_written(observed: Observed) -> None:
    assert (observed.task["status"], observed.task["iterations"]) == ("completed", 3), observed.task
    assert (observed.counts["iteration_start"], observed.counts["tool_call_complete"]) == (3, 3)


def test_an_open_stream_is_active_and_counts_each_event_it_wrote(observed: Observed) -> None:
    during, moved = observed.during, Delta(observed.before, observed.during)
    assert value(during, "alex_sse_connections_active") == 1
    assert value(during, "alex_http_requests_in_flight") == 0, "neither a stream nor a scrape is in flight"
    assert moved("alex_sse_connections_opened_total") == 1
    assert moved.moved("alex_sse_events_sent_total") == {labels(event_type=k): n for k, n in observed.counts.items()}
    assert moved("alex_sse_bytes_sent_total") == observed.frame_bytes
    assert moved("alex_sse_time_to_first_event_seconds_count") == 1
    assert 1 <= moved("alex_sse_delivery_latency_seconds_count") <= observed.counts.total(), "one a write, at most"
    assert moved("alex_sse_connection_duration_seconds_count") == 0
    assert moved.moved("alex_sse_connections_closed_total") == {}
    assert labels(method="GET", route="/api/sse", status="200") not in moved.moved("alex_http_requests_total")


def test_a_closed_stream_is_counted_once_as_client_gone(observed: Observed) -> None:
    after, moved = observed.after, Delta(observed.before, observed.after)
    assert value(after, "alex_sse_connections_active") == 0
    assert moved("alex_sse_connections_opened_total") == 1
    assert moved.moved("alex_sse_connections_closed_total") == {labels(reason="client_gone"): 1}
    assert moved("alex_sse_connection_duration_seconds_count") == 1
    assert moved("alex_sse_time_to_first_event_seconds_count") == 1
    assert moved.moved("alex_sse_connections_rejected_total") == {}
    assert moved.moved("alex_sse_events_dropped_total") == {}
    assert moved.moved("alex_sse_events_sent_total") == {labels(event_type=k): n for k, n in observed.counts.items()}


def test_the_task_is_counted_with_its_iterations(observed: Observed) -> None:
    after, moved = observed.after, Delta(observed.before, observed.after)
    assert moved("alex_tasks_submitted_total") == 1
    assert moved.moved("alex_tasks_finished_total") == {labels(outcome="completed"): 1}
    assert moved.moved("alex_task_duration_seconds_count") == {labels(outcome="completed"): 1}
    assert value(after, "alex_tasks_in_progress") == 0
    assert moved("alex_task_queue_wait_seconds_count") == 1
    assert moved("alex_iterations_total") == 3
    assert moved("alex_iteration_duration_seconds_count") == 3
    assert (moved("alex_task_iterations_count"), moved("alex_task_iterations_sum")) == (1, 3)


def test_each_tool_call_is_counted_by_tool_and_outcome(observed: Observed) -> None:
    moved = Delta(observed.before, observed.after)
    assert moved.moved("alex_tool_calls_total") == {labels(tool="list_files", outcome="ok"): 2,
                                                    labels(tool="file_read", outcome="error"): 1}
    assert moved.moved("alex_tool_duration_seconds_count") == {labels(tool="list_files"): 2,
                                                               labels(tool="file_read"): 1}


def test_each_model_call_is_counted_with_the_tokens_the_task_used(observed: Observed) -> None:
    moved, usage = Delta(observed.before, observed.after), observed.task["usage"]
    assert moved.moved("gen_ai_client_operation_duration_seconds_count") == {labels(**CHAT, error_type=""): 3}
    assert moved.moved("gen_ai_client_token_usage_count") == {labels(**CHAT, gen_ai_token_type="input"): 3,
                                                              labels(**CHAT, gen_ai_token_type="output"): 3}
    assert moved("gen_ai_client_token_usage_sum", **CHAT, gen_ai_token_type="input") == usage["prompt_tokens"]
    assert moved("gen_ai_client_token_usage_sum", **CHAT, gen_ai_token_type="output") == usage["completion_tokens"]
    assert moved.moved("alex_llm_time_to_first_chunk_seconds_count") == {labels(model="mock"): 3}
    assert moved.moved("alex_llm_errors_total") == {}


def test_the_stream_is_a_request_counted_once_it_ended_but_not_a_latency(observed: Observed) -> None:
    moved = Delta(observed.before, observed.after)
    requests = moved.moved("alex_http_requests_total")
    assert requests[labels(method="POST", route="/api/tasks", status="202")] == 1
    assert requests[labels(method="GET", route="/api/sse", status="200")] == 1
    latencies = moved.moved("alex_http_request_duration_seconds_count")
    assert latencies[labels(method="POST", route="/api/tasks")] == 1
    assert labels(method="GET", route="/api/sse") not in latencies, "a stream's lifetime is not request latency"


# Failures


async def test_a_model_error_is_counted_by_its_kind(failing_server: ServerProcess) -> None:
    async with connect(failing_server) as client, connect(failing_server, None) as scraper:
        before = await scrape(scraper)
        task = await wait_finished(client, await submit(client, "think hard", "metrics-model-error"))
        after = await scrape_until(scraper, lambda series: Delta(before, series)(
            "alex_tasks_finished_total", outcome="failed") > 0)

    assert (task["status"], task["iterations"]) == ("failed", 1), task
    moved = Delta(before, after)
    assert moved.moved("alex_llm_errors_total") == {labels(model="mock", error_type=MODEL_ERROR): 1}
    assert moved.moved("alex_tasks_finished_total") == {labels(outcome="failed"): 1}
    assert moved.moved("gen_ai_client_operation_duration_seconds_count") == {labels(**CHAT, error_type=MODEL_ERROR): 1}
    assert moved.moved("gen_ai_client_token_usage_count") == {}, "a failed call has no usage to count"
    assert moved.moved("alex_llm_time_to_first_chunk_seconds_count") == {}
    assert moved.moved("alex_tool_calls_total") == {}
    assert moved("alex_iterations_total") == 1
    assert value(after, "alex_tasks_in_progress") == 0


async def test_a_cancelled_task_and_its_cut_tool_call_are_counted_as_cancelled(plain_server: ServerProcess) -> None:
    session_id = "metrics-cancel"
    async with connect(plain_server) as client, connect(plain_server, None) as scraper:
        before = await scrape(scraper)
        async with open_stream(client, session_id) as messages:
            task_id = await submit(client, "$ sleep 30", session_id)
            async with asyncio.timeout(STREAM_TIMEOUT):
                async for message in messages:
                    if message.event == "tool_call_start":
                        break
            running_now = await scrape(scraper)
            response = await client.post(f"/api/tasks/{task_id}/cancel")
            assert response.status_code == 202, response.text
            task = await wait_finished(client, task_id)
        # Its stream's request counted too, so that no later test sees it move.
        after = await scrape_until(scraper, lambda series: Delta(before, series)(
            "alex_tasks_finished_total", outcome="cancelled") > 0 and stream_ended(Delta(before, series)))

    assert task["status"] == "cancelled", task
    assert value(running_now, "alex_tasks_in_progress") == 1
    moved = Delta(before, after)
    assert moved.moved("alex_tasks_finished_total") == {labels(outcome="cancelled"): 1}
    assert moved.moved("alex_task_duration_seconds_count") == {labels(outcome="cancelled"): 1}
    assert moved.moved("alex_tool_calls_total") == {labels(tool="bash", outcome="cancelled"): 1}
    assert moved.moved("alex_tool_duration_seconds_count") == {labels(tool="bash"): 1}
    assert moved.moved("gen_ai_client_operation_duration_seconds_count") == {labels(**CHAT, error_type=""): 1}
    assert moved.moved("alex_llm_errors_total") == {}
    assert value(after, "alex_tasks_in_progress") == 0


# Refusals


def bearer(jwt: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt}"}


REFUSALS = [
    pytest.param("missing_token", "GET", {}, 401, id="no token"),
    pytest.param("malformed_header", "GET", {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, 401, id="not bearer"),
    pytest.param("expired", "GET", bearer(mint_token(SECRET, "alice", ALL_SCOPES, -100)), 401, id="expired"),
    pytest.param("bad_signature", "GET", bearer(mint_token("another-secret-that-is-32-bytes-long!", "alice",
                                                           ALL_SCOPES, 3600)), 401, id="other key"),
    pytest.param("insufficient_scope", "POST", bearer(token("alice", ("sessions:read",))), 403, id="lacks scope"),
]


@pytest.mark.parametrize(("reason", "method", "headers", "status"), REFUSALS)
async def test_a_refused_token_is_counted_once_by_its_reason(
        plain_server: ServerProcess, reason: str, method: str, headers: dict[str, str], status: int) -> None:
    async with httpx.AsyncClient(base_url=plain_server.base_url, timeout=10.0) as anonymous:
        before = await scrape(anonymous)
        if method == "GET":
            response = await anonymous.get("/api/sessions", headers=headers)
        else:
            response = await anonymous.post("/api/tasks", json={"task": "hi", "session_id": "metrics-scope"},
                                            headers=headers)
        after = await scrape(anonymous)
    assert response.status_code == status, response.text
    moved = Delta(before, after)
    assert moved.moved("alex_auth_failures_total") == {labels(reason=reason): 1}
    route = "/api/sessions" if method == "GET" else "/api/tasks"
    assert moved.moved("alex_http_requests_total") == {labels(method=method, route=route, status=str(status)): 1}
    assert moved.moved("alex_tasks_submitted_total") == {}


async def test_a_request_no_route_takes_is_counted_as_unmatched(plain_server: ServerProcess) -> None:
    marker = "no-such-route-7f3a"
    async with connect(plain_server) as client, connect(plain_server, None) as scraper:
        before = await scrape(scraper)
        response = await client.get(f"/api/{marker}/deeper")
        after = await scrape(scraper)
    assert response.status_code == 404, response.text
    moved = Delta(before, after)
    assert moved.moved("alex_http_requests_total") == {labels(method="GET", route="unmatched", status="404"): 1}
    assert moved.moved("alex_http_request_duration_seconds_count") == {labels(method="GET", route="unmatched"): 1}
    assert not [key for key in after if any(marker in v for _, v in key[1])], "a path became a label value"


async def test_build_info_is_one_series_valued_one(plain_server: ServerProcess) -> None:
    async with connect(plain_server, None) as scraper:
        series = await scrape(scraper)
    info = {key[1]: v for key, v in series.items() if key[0] == "alex_build_info"}
    assert info == {labels(version=__version__, python_version=platform.python_version(), provider="mock",
                           model="mock"): 1.0}


async def test_every_route_has_its_series_from_the_start(plain_server: ServerProcess) -> None:
    async with connect(plain_server, None) as scraper:
        schema = await scraper.get("/openapi.json")
        series = await scrape(scraper)
    assert schema.status_code == 200, schema.text
    routes = {(method.upper(), path) for path, operations in schema.json()["paths"].items() for method in operations}
    expected = {("alex_http_request_duration_seconds_count", labels(method=method, route=path))
                for method, path in routes}
    expected |= {("alex_rate_limit_rejections_total", labels(route=path)) for _, path in routes
                 if path.startswith("/api/")}
    assert {("POST", "/api/tasks"), ("GET", "/api/sse"), ("GET", "/ready")} <= routes, routes
    assert sorted(expected - series.keys()) == []


# Limits


async def test_a_rate_limited_request_is_counted_by_its_route() -> None:
    with running(ALEX_RATE_LIMIT_DEFAULT="2/minute") as server:
        async with connect(server) as client, connect(server, None) as scraper:
            before = await scrape(scraper)
            statuses = [(await client.get("/api/sessions")).status_code for _ in range(3)]
            # Scrapes are not limited: with two before it, this third one (by address, no token) still answers.
            await scrape(scraper)
            after = await scrape(scraper)
    assert statuses == [200, 200, 429]
    moved = Delta(before, after)
    assert moved.moved("alex_rate_limit_rejections_total") == {labels(route="/api/sessions"): 1}
    assert moved.moved("alex_http_requests_total") == {labels(method="GET", route="/api/sessions", status="200"): 2,
                                                       labels(method="GET", route="/api/sessions", status="429"): 1}


async def test_a_stream_over_the_server_cap_is_refused_and_counted() -> None:
    with running(ALEX_MAX_STREAMS="1") as server:
        async with (connect(server, "alice") as alice, connect(server, "bob") as bob,
                    connect(server, None) as scraper):
            before = await scrape(scraper)
            async with open_stream(alice, "cap-alice"):
                refused = await bob.get("/api/sse", params={"session_id": "cap-bob"})
                during = await scrape(scraper)
            after = await scrape_until(scraper, lambda series: streams_idle(series) and stream_ended(
                Delta(before, series)))
            # The place is given back: bob's stream opens now.
            async with open_stream(bob, "cap-bob"):
                pass

    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["status"] == 503
    assert value(before, "alex_sse_connections_limit") == 1
    moved = Delta(before, during)
    assert moved.moved("alex_sse_connections_rejected_total") == {labels(reason="server_cap"): 1}
    assert moved("alex_sse_connections_opened_total") == 1
    assert value(during, "alex_sse_connections_active") == 1
    assert moved.moved("alex_http_requests_total") == {labels(method="GET", route="/api/sse", status="503"): 1}
    assert value(after, "alex_sse_connections_active") == 0
    assert Delta(before, after).moved("alex_sse_connections_rejected_total") == {labels(reason="server_cap"): 1}
