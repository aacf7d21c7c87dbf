"""Property-based tests generated from the live server's own OpenAPI document (schemathesis 4).

Every operation gets bounded, reproducible examples (valid ones, and invalid ones where its parameters can be
made invalid), sent with a token that holds every scope. Two properties: no answer is a 5xx; and every answer
is what the document declares (status code, content type, headers, body schema).

schemathesis's lazy pytest loader (``schemathesis.pytest.from_fixture``) writes ``Function._nodeid``, which
pytest 9 no longer has; so each operation's Hypothesis test is built here from ``APIOperation.as_strategy`` and
run inside an ordinary parametrized test, against a server that a module fixture starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.server import ServerProcess, token

pytestmark = pytest.mark.integration

EVERY_SCOPE = ("tasks:write", "sessions:read", "sessions:write", "admin")
MAX_EXAMPLES = 20
VALID, INVALID = GenerationMode.POSITIVE, GenerationMode.NEGATIVE

OPERATIONS = {
    # (method, path): the generation modes that apply. Invalid examples need a parameter or body that has a
    # constraint to break; a bare path string (any text is a well-formed id) has none.
    ("GET", "/health"): (VALID,),
    ("GET", "/ready"): (VALID,),
    ("POST", "/api/tasks"): (VALID, INVALID),
    ("GET", "/api/tasks/{task_id}"): (VALID,),
    ("POST", "/api/tasks/{task_id}/cancel"): (VALID,),
    ("GET", "/api/sessions"): (VALID,),
    ("GET", "/api/sessions/{session_id}"): (VALID,),
    ("DELETE", "/api/sessions/{session_id}"): (VALID,),
    ("GET", "/api/sessions/{session_id}/events"): (VALID, INVALID),
    ("GET", "/api/sse"): (VALID, INVALID),
}
"""The operations of API.md; :func:`test_the_document_lists_exactly_the_known_operations` keeps it honest."""

CASES = [(method, path, mode) for (method, path), modes in OPERATIONS.items() for mode in modes]

CONFORMANCE = [status_code_conformance, content_type_conformance, response_headers_conformance,
               response_schema_conformance]
"""What the answers must match. Left out on purpose: ``positive_data_acceptance`` and ``negative_data_rejection``
judge whether an input should have been accepted, and a valid request may rightly answer 404 (a session id
nobody holds), 409 (a task already runs in that session) or 429. The event stream keeps every check: it is read
up to its first event (``max-stream-events``), so its status, content type and headers are judged like any
other answer's; its body, ``text/event-stream``, has no schema to match."""

def _case_id(method: str, path: str, mode: GenerationMode) -> str:
    return f"{method} {path} {'valid' if mode is VALID else 'invalid'}"


def _params() -> list[Any]:
    return [pytest.param(method, path, mode, id=_case_id(method, path, mode)) for method, path, mode in CASES]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Valid task submissions arrive in bursts: the per-client cap on running tasks would only add 429s. The mock
    # model is slow on purpose, so that a task is still running when the next example reuses its session id:
    # that example then always meets the 409, whatever the machine's speed.
    process = ServerProcess(tmp_path_factory.mktemp("schemathesis") / "data",
                            env={"ALEX_MAX_TASKS_PER_CLIENT": "1000", "ALEX_MOCK_DELAY_MS": "1000"}).start()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture(scope="module")
def api_schema(live_server: ServerProcess) -> Any:
    config = schemathesis.Config.from_dict({
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        # An event stream never ends; it is judged by its answer and its first event (``connected``).
        "max-stream-events": 1,
        "request-timeout": 10,
    })
    return schemathesis.openapi.from_url(live_server.base_url + "/openapi.json", config=config)


def exercise(api_schema: Any, server: ServerProcess, operation_key: tuple[str, str, GenerationMode], *,
             checks: list[Any]) -> int:
    """Send up to ``MAX_EXAMPLES`` generated requests to the operation, each checked; returns how many were sent."""
    method, path, mode = operation_key
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {token('fuzzer', EVERY_SCOPE)}"}
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(base_url=server.base_url, headers=headers, checks=checks)

    run()
    return sent


def test_the_document_lists_exactly_the_known_operations(api_schema: Any) -> None:
    live = {(op.method.upper(), op.path) for op in (result.ok() for result in api_schema.get_all_operations())}
    assert live == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), _params())
def test_no_generated_request_gets_a_server_error(api_schema: Any, live_server: ServerProcess, method: str,
                                                  path: str, mode: GenerationMode) -> None:
    assert exercise(api_schema, live_server, (method, path, mode), checks=[not_a_server_error]) > 0


@pytest.mark.parametrize(("method", "path", "mode"), _params())
def test_every_answer_is_what_the_document_declares(api_schema: Any, live_server: ServerProcess, method: str,
                                                    path: str, mode: GenerationMode) -> None:
    assert exercise(api_schema, live_server, (method, path, mode), checks=CONFORMANCE) > 0


def test_the_document_declares_the_bearer_scheme(api_schema: Any) -> None:
    document = api_schema.raw_schema
    schemes = document.get("components", {}).get("securitySchemes", {})
    assert any(s.get("type") == "http" and s.get("scheme", "").lower() == "bearer" for s in schemes.values())
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/api/"):
            assert operation.definition.raw.get("security"), operation.label


def test_the_server_survived_the_fuzzing(live_server: ServerProcess) -> None:
    """After every generated request the server still answers, and it logged no unexpected failure."""
    assert httpx.get(live_server.base_url + "/ready", timeout=5).status_code == 200
    assert live_server.process.poll() is None
    failures = live_server.events_logged("request_failed")
    assert not failures, failures[:3]
