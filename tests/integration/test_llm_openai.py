"""The OpenAI adapter against a fake OpenAI-compatible server over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import openai
import pytest

from service.adapters.llm.openai_chat import OpenAIChatModel
from service.domain.llm import LLMError, Message, ToolCall, ToolSpec, Usage
from tests.fakes.openai_server import FakeOpenAI, tool_call
from tests.integration.server import free_port

pytestmark = pytest.mark.integration

KEY = "sk-test-abcdef0123456789"
BASH = ToolSpec(
    "bash",
    "Run a shell command.",
    {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
)
TASK = [Message("system", "You are an agent."), Message("user", "List the files.")]

UNFINISHED_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}

NAMELESS_CALL_CHUNK = {
    **UNFINISHED_CHUNK,
    "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, "finish_reason": "stop"}
    ],
}

ModelFactory = Callable[..., OpenAIChatModel]


class Sink:
    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.first = asyncio.Event()

    async def __call__(self, delta: str) -> None:
        self.deltas.append(delta)
        self.first.set()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def make_model(fake: FakeOpenAI) -> AsyncIterator[ModelFactory]:
    """Models pointed at the fake (1s timeout, no retries unless asked), closed after the test."""
    models: list[OpenAIChatModel] = []

    def make(**overrides: Any) -> OpenAIChatModel:
        options: dict[str, Any] = {
            "api_key": KEY,
            "model": "gpt-test",
            "base_url": fake.base_url,
            "timeout_seconds": 1.0,
            "max_retries": 0,
            **overrides,
        }
        model = OpenAIChatModel(**options)
        models.append(model)
        return model

    yield make
    for model in models:
        await model.aclose()


async def failure(call: Awaitable[object]) -> LLMError:
    with pytest.raises(LLMError) as caught:
        await call
    return caught.value


# Answers


async def test_text_deltas_arrive_in_order(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_text("one two three four five")
    sink = Sink()
    response = await make_model().chat(TASK, [], sink)
    assert sink.deltas == ["one two", " three four", " five"]
    assert response.content == "one two three four five"
    assert (response.tool_calls, response.finish_reason) == ((), "stop")


async def test_parallel_tool_calls_are_assembled_from_split_deltas(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_tool_calls(
        [
            tool_call("bash", {"command": "ls -la /work && echo done"}, call_id="call_a"),
            tool_call("bash", {"command": "cat README.md | head -n 20"}, call_id="call_b"),
        ],
        text="Two things at once.",
        interleave=True,
    )
    sink = Sink()
    response = await make_model().chat(TASK, [BASH], sink)
    assert response.content == "".join(sink.deltas) == "Two things at once."
    assert response.finish_reason == "tool_calls"
    assert [(call.id, call.name, json.loads(call.arguments)) for call in response.tool_calls] == [
        ("call_a", "bash", {"command": "ls -la /work && echo done"}),
        ("call_b", "bash", {"command": "cat README.md | head -n 20"}),
    ]


async def test_usage_and_model_come_from_the_stream(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_text("hi", usage=(123, 45), model="gpt-test-2025-01-01")
    response = await make_model().chat(TASK, [], Sink())
    assert response.usage == Usage(prompt_tokens=123, completion_tokens=45)
    assert response.model == "gpt-test-2025-01-01"


async def test_an_empty_queue_answers_ok(make_model: ModelFactory) -> None:
    response = await make_model().chat(TASK, [], Sink())
    assert response.content == "ok"


# The request


async def test_the_request_carries_tools_usage_option_and_wire_messages(
    fake: FakeOpenAI, make_model: ModelFactory
) -> None:
    call = ToolCall("call_1", "bash", '{"command": "ls"}')
    messages = [
        *TASK,
        Message("assistant", "", tool_calls=(call,)),
        Message("tool", "a.txt\nb.txt", tool_call_id="call_1", name="bash"),
        Message("assistant", "Two files."),
        Message("user", "Thanks, now count them."),
    ]
    await make_model().chat(messages, [BASH], Sink())
    [request] = fake.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.authorization == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "gpt-test"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["tool_choice"] == "auto"
    function = {"name": "bash", "description": BASH.description, "parameters": dict(BASH.parameters)}
    assert body["tools"] == [{"type": "function", "function": function}]
    assert body["messages"] == [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "List the files."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt\nb.txt"},
        {"role": "assistant", "content": "Two files."},
        {"role": "user", "content": "Thanks, now count them."},
    ]


async def test_without_tools_the_request_names_none(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    await make_model(api_key=None).chat(TASK, [], Sink())
    [request] = fake.requests
    assert "tools" not in request.body
    assert "tool_choice" not in request.body
    # A keyless server still gets a bearer token: the SDK refuses to send none.
    assert request.authorization == "Bearer not-needed"


# Failures


async def test_a_server_error_is_retried(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_error(500, retry_after_ms=10)
    fake.enqueue_text("second time lucky")
    response = await make_model(max_retries=1).chat(TASK, [], Sink())
    assert response.content == "second time lucky"
    assert len(fake.requests) == 2


async def test_a_bad_key_is_an_auth_error_that_does_not_show_the_key(
    fake: FakeOpenAI, make_model: ModelFactory
) -> None:
    fake.enqueue_error(401)  # the fake echoes the bearer token in its message
    error = await failure(make_model(max_retries=2).chat(TASK, [], Sink()))
    assert error.kind == "auth"
    assert "401" in str(error)
    assert KEY not in str(error)
    assert KEY not in repr(error)
    assert error.__cause__ is None
    assert len(fake.requests) == 1  # 401 is not retried


async def test_rate_limits_past_the_retries_are_rate_limit_errors(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_error(429, "Rate limit reached for gpt-test.", retry_after_ms=10)
    fake.enqueue_error(429, "Rate limit reached for gpt-test.", retry_after_ms=10)
    error = await failure(make_model(max_retries=1).chat(TASK, [], Sink()))
    assert error.kind == "rate_limit"
    assert "Rate limit reached" in str(error)
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "bad_request"), (403, "auth"), (404, "bad_request"), (422, "bad_request"), (503, "server"), (418, "error")],
)
async def test_statuses_map_to_bounded_kinds(
    fake: FakeOpenAI, make_model: ModelFactory, status: int, kind: str
) -> None:
    fake.enqueue_error(status)
    error = await failure(make_model().chat(TASK, [], Sink()))
    assert error.kind == kind
    assert str(status) in str(error)


async def test_a_stalled_stream_fails_within_the_timeout(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_stall("partial answer")
    sink = Sink()
    started = time.monotonic()
    error = await failure(make_model(timeout_seconds=1.0).chat(TASK, [], sink))
    elapsed = time.monotonic() - started
    assert error.kind == "timeout"
    assert 0.9 <= elapsed < 3.0
    assert "".join(sink.deltas) == "partial answer"


async def test_keepalive_bytes_without_chunks_still_time_out(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    # The SDK's read timeout restarts with every byte; a ping every 0.2s would hold it off for ever.
    fake.enqueue_stall("partial", keepalive_seconds=0.2)
    started = time.monotonic()
    error = await failure(make_model(timeout_seconds=1.0).chat(TASK, [], Sink()))
    assert error.kind == "timeout"
    assert time.monotonic() - started < 3.0
    [request] = fake.requests
    assert await asyncio.to_thread(request.client_gone.wait, 5)


async def test_a_cut_stream_is_a_stream_error(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_cut("half of it")
    sink = Sink()
    error = await failure(make_model().chat(TASK, [], sink))
    assert error.kind == "stream"
    assert "".join(sink.deltas) == "half of it"


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ("data: {not json\n\n", "stream"),
        # A clean end without a finish reason: the server stopped before the model did.
        (f"data: {json.dumps(UNFINISHED_CHUNK)}\n\ndata: [DONE]\n\n", "stream"),
        ('data: {"error": {"message": "The server is overloaded.", "type": "server_error"}}\n\n', "server"),
        (f"data: {json.dumps({**UNFINISHED_CHUNK, 'choices': 'none'})}\n\ndata: [DONE]\n\n", "stream"),
        (f"data: {json.dumps({**UNFINISHED_CHUNK, 'choices': [{'index': 0, 'delta': 'hi'}]})}\n\n", "stream"),
        (f"data: {json.dumps(NAMELESS_CALL_CHUNK)}\n\ndata: [DONE]\n\n", "stream"),
    ],
)
async def test_malformed_or_failing_streams(fake: FakeOpenAI, make_model: ModelFactory, body: str, kind: str) -> None:
    fake.enqueue_raw(body)
    error = await failure(make_model().chat(TASK, [], Sink()))
    assert error.kind == kind


async def test_an_unreachable_server_is_a_connection_error(make_model: ModelFactory) -> None:
    port = free_port()
    # Nothing listens on the port once the probe is closed.
    error = await failure(make_model(base_url=f"http://127.0.0.1:{port}/v1").chat(TASK, [], Sink()))
    assert error.kind == "connection"


async def test_cancelling_mid_stream_closes_the_connection(fake: FakeOpenAI, make_model: ModelFactory) -> None:
    fake.enqueue_stall("first words")
    sink = Sink()
    task = asyncio.create_task(make_model(timeout_seconds=30.0).chat(TASK, [], sink))
    await asyncio.wait_for(sink.first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [request] = fake.requests
    assert await asyncio.to_thread(request.client_gone.wait, 5)


# The fake itself, from synchronous code


def test_the_fake_serves_sync_clients_and_plain_completions(fake: FakeOpenAI) -> None:
    fake.enqueue_tool_calls([{"name": "bash", "arguments": {"command": "pwd"}, "id": "call_x"}], text="Checking.")
    with openai.OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0) as client:
        completion = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    message = completion.choices[0].message
    assert message.content == "Checking."
    assert message.tool_calls is not None
    [call] = message.tool_calls
    assert call.type == "function"
    assert (call.id, call.function.name, call.function.arguments) == ("call_x", "bash", '{"command": "pwd"}')
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    assert fake.requests[0].body.get("stream") is None
