"""A whole task through the real server and its OpenAI adapter, against the fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from service.client import SseMessage
from tests.fakes.openai_server import FakeOpenAI, tool_call
from tests.integration.calls import STREAM_TIMEOUT, TERMINAL, open_stream, submit, wait_finished
from tests.integration.server import ServerProcess, auth, data_folder

pytestmark = pytest.mark.integration

KEY = "sk-test"


@contextlib.contextmanager
def openai_server(fake: FakeOpenAI, **env: str) -> Iterator[ServerProcess]:
    """The real server with the OpenAI provider pointed at ``fake``."""
    settings = {"ALEX_LLM_PROVIDER": "openai", "OPENAI_API_KEY": KEY, "ALEX_BASE_URL": fake.base_url,
                **env}
    with data_folder() as data:
        process = ServerProcess(data, env=settings).start()
        try:
            yield process
        finally:
            process.kill()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


async def until_terminal(messages: AsyncIterator[SseMessage], task_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for message in messages:
            body = message.json()
            assert body["task_id"] == task_id
            events.append(body)
            if message.event in TERMINAL:
                return events
    raise AssertionError(f"the stream ended early: {[e['event_type'] for e in events]}")


def of_type(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event_type"] == event_type]


async def test_a_task_runs_end_to_end_against_an_openai_compatible_server(fake: FakeOpenAI) -> None:
    fake.enqueue_tool_calls([tool_call("bash", {"command": "echo from-fake"}, call_id="call_e2e_1")],
                            text="Let me run it.", usage=(100, 20))
    fake.enqueue_text("The command printed from-fake. Done.", usage=(150, 30))
    with openai_server(fake) as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client:
            async with open_stream(client, "openai-session") as stream:
                task_id = await submit(client, "Run echo from-fake and tell me what it printed.", "openai-session")
                events = await until_terminal(stream, task_id)
            task = await wait_finished(client, task_id)

            # A second task continues the conversation: the model gets the first one with it.
            fake.enqueue_text("You ran echo from-fake.", usage=(300, 10))
            second = await wait_finished(client, await submit(client, "What did you run?", "openai-session"))

    # The thinking deltas are the fake's text chunks, in order, per iteration.
    thinking = of_type(events, "thinking")
    assert [(e["iteration"], e["delta"]) for e in thinking] == [
        (1, "Let me"), (1, " run it."), (2, "The command"), (2, " printed from-fake."), (2, " Done.")]
    think = of_type(events, "think_complete")
    assert think[0]["content"] == "Let me run it."
    assert think[0]["tool_calls"] == [{"call_id": "call_e2e_1", "tool_name": "bash"}]

    # The tool call, assembled from its split argument deltas, and its real output.
    start, = of_type(events, "tool_call_start")
    assert (start["tool_name"], start["call_id"], start["arguments"]) == (
        "bash", "call_e2e_1", {"command": "echo from-fake"})
    assert "".join(e["chunk"] for e in of_type(events, "tool_call_stream")) == "from-fake\n"
    complete, = of_type(events, "tool_call_complete")
    assert (complete["result"], complete["error"]) == ("from-fake\n", None)

    assert [e["tokens_used"] for e in of_type(events, "iteration_complete")] == [120, 180]
    done = events[-1]
    assert done["event_type"] == "task_complete"
    assert done["final_answer"] == "The command printed from-fake. Done."
    assert (done["total_iterations"], done["total_tokens"]) == (2, 300)
    assert task["status"] == "completed"
    assert task["usage"] == {"prompt_tokens": 250, "completion_tokens": 50, "total_tokens": 300}

    check_requests(fake)
    assert second["status"] == "completed"
    assert second["final_answer"] == "You ran echo from-fake."


def check_requests(fake: FakeOpenAI) -> None:
    requests = fake.requests
    assert len(requests) == 3
    for request in requests:
        assert (request.method, request.path) == ("POST", "/v1/chat/completions")
        assert request.authorization == f"Bearer {KEY}"
        assert request.body["stream"] is True
        assert "bash" in [tool["function"]["name"] for tool in request.body["tools"]]
    first_messages = requests[0].body["messages"]
    assert [m["role"] for m in first_messages] == ["system", "user"]
    # The second request carries the assistant's tool call and the tool's result, tied by the call id.
    second_messages = requests[1].body["messages"]
    assert [m["role"] for m in second_messages] == ["system", "user", "assistant", "tool"]
    assistant, result = second_messages[2], second_messages[3]
    assert assistant["tool_calls"][0]["id"] == "call_e2e_1"
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"command": "echo from-fake"}
    assert result["tool_call_id"] == "call_e2e_1"
    assert result["content"] == "from-fake\n"

    # The second task's request holds the whole first exchange, then the new question.
    third_messages = requests[2].body["messages"]
    assert third_messages[:5] == [*second_messages, {"role": "assistant",
                                                     "content": "The command printed from-fake. Done."}]
    assert third_messages[5] == {"role": "user", "content": "What did you run?"}


async def test_a_model_failing_with_500_fails_the_task_promptly(fake: FakeOpenAI) -> None:
    for _ in range(5):
        fake.enqueue_error(500, "the fake model is down")
    with openai_server(fake, ALEX_LLM_MAX_RETRIES="1", ALEX_LLM_TIMEOUT_SECONDS="2") as server:
        async with httpx.AsyncClient(base_url=server.base_url, headers=auth("alice"), timeout=10.0) as client:
            async with open_stream(client, "failing-model") as stream:
                started = time.monotonic()
                task_id = await submit(client, "Say hello.", "failing-model")
                events = await until_terminal(stream, task_id)
                elapsed = time.monotonic() - started
            task = await wait_finished(client, task_id)

    error = events[-1]
    assert error["event_type"] == "error"
    assert error["recoverable"] is False
    assert "500" in error["error"]
    assert "the fake model is down" in error["error"]
    assert elapsed < 8, f"the failure took {elapsed:.1f}s"
    assert len(fake.requests) == 2, "one try and one retry (ALEX_LLM_MAX_RETRIES=1)"
    assert task["status"] == "failed"
    assert "500" in task["error"]
    assert KEY not in json.dumps(events) + json.dumps(task)
