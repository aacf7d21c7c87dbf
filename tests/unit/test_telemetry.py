"""The engine's spans and metrics (AgentTelemetry), read back from an in-memory exporter and the metric registry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.domain.engine import EngineConfig, ReactEngine, TaskRequest, TaskResult
from service.domain.llm import LLMError
from service.domain.tools import Tool, ToolRegistry
from service.observability.agent import AgentTelemetry
from service.observability.metrics import Metrics
from tests.unit.fakes import (
    EchoTool,
    FailingTool,
    MemoryTodoList,
    RecordingSink,
    ScriptedModel,
    SlowTool,
    Turn,
    answer,
    call,
    tool_turn,
)

SESSION, TASK = "s1", "t_1"


class Rig:
    def __init__(self, turns: Iterable[Turn], tools: Iterable[Tool], *, content: bool = False) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.metrics = Metrics(process=False)
        self.model = ScriptedModel(turns, model="gpt-test")
        registry = ToolRegistry(tools)
        self.telemetry = AgentTelemetry(provider.get_tracer("test"), self.metrics, provider="openai",
                                        model="gpt-test", tools=registry.names, capture_content=content)
        self.engine = ReactEngine(self.model, registry, EngineConfig(), telemetry=self.telemetry)

    async def run(self, tmp_path: Path, text: str = "look around") -> TaskResult:
        async with asyncio.timeout(10):
            return await self.engine.run(TaskRequest(SESSION, TASK, text), [], RecordingSink(),
                                         workspace=tmp_path, todos=MemoryTodoList())

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans()]
        return found[0]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    value: int = span.context.span_id
    return value


def iteration_of(span: ReadableSpan) -> int:
    number = (span.attributes or {})["alex.iteration"]
    assert isinstance(number, int)
    return number


def two_tool_script() -> list[Turn]:
    return [
        tool_turn(call("echo", {"text": "a"}, "call_1"), call("fail", {}, "call_2"), prompt_tokens=100,
                  completion_tokens=20),
        answer("All done.", prompt_tokens=150, completion_tokens=10),
    ]


async def test_a_task_is_one_tree_of_agent_iteration_chat_and_tool_spans(tmp_path: Path) -> None:
    rig = Rig(two_tool_script(), [EchoTool(), FailingTool()])
    await rig.run(tmp_path)

    agent = rig.span("invoke_agent")
    iterations = sorted((s for s in rig.spans() if s.name == "iteration"), key=iteration_of)
    chats = [s for s in rig.spans() if s.name == "chat gpt-test"]
    echo, fail = rig.span("execute_tool echo"), rig.span("execute_tool fail")

    assert [iteration_of(s) for s in iterations] == [1, 2]
    assert agent.parent is None
    assert {parent_of(s) for s in iterations} == {span_id(agent)}
    assert sorted(parent_of(s) or 0 for s in chats) == sorted(span_id(s) for s in iterations)
    assert parent_of(echo) == parent_of(fail) == span_id(iterations[0])
    assert {s.context.trace_id for s in rig.spans() if s.context} == {agent.context.trace_id if agent.context else 0}
    assert (agent.kind, iterations[0].kind, chats[0].kind, echo.kind) == (
        SpanKind.INTERNAL, SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.INTERNAL)

    assert dict(agent.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "alex", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-test", "gen_ai.conversation.id": SESSION, "alex.task.id": TASK,
        "alex.task.outcome": "completed", "alex.task.iterations": 2,
    }
    first = dict(chats[0].attributes or {})
    assert first["gen_ai.operation.name"] == "chat"
    assert (first["gen_ai.usage.input_tokens"], first["gen_ai.usage.output_tokens"]) == (100, 20)
    assert first["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert dict(echo.attributes or {}) == {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "echo",
                                           "gen_ai.tool.call.id": "call_1", "gen_ai.tool.type": "function"}
    assert echo.status.status_code is StatusCode.UNSET
    assert (fail.attributes or {})["error.type"] == "tool_error"
    assert fail.status.status_code is StatusCode.ERROR
    assert agent.status.status_code is StatusCode.UNSET


async def test_the_metrics_count_what_the_task_did(tmp_path: Path) -> None:
    rig = Rig(two_tool_script(), [EchoTool(), FailingTool()])
    await rig.run(tmp_path)

    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai", "gen_ai_request_model": "gpt-test"}
    assert rig.sample("alex_iterations_total") == 2
    assert rig.sample("alex_iteration_duration_seconds_count") == 2
    assert rig.sample("gen_ai_client_operation_duration_seconds_count", **genai, error_type="") == 2
    assert rig.sample("gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="input") == 250
    assert rig.sample("gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="output") == 30
    assert rig.sample("gen_ai_client_token_usage_count", **genai, gen_ai_token_type="output") == 2
    assert rig.sample("alex_tool_calls_total", tool="echo", outcome="ok") == 1
    assert rig.sample("alex_tool_calls_total", tool="fail", outcome="error") == 1
    assert rig.sample("alex_tool_calls_total", tool="fail", outcome="ok") == 0
    assert rig.sample("alex_tool_duration_seconds_count", tool="echo") == 1


async def test_a_call_to_a_tool_that_does_not_exist_is_counted_under_one_label(tmp_path: Path) -> None:
    rig = Rig([tool_turn(call("rm -rf /", {}, "call_1")), answer()], [EchoTool()])
    await rig.run(tmp_path)

    assert rig.sample("alex_tool_calls_total", tool="unknown", outcome="error") == 1
    assert rig.span("execute_tool unknown").attributes == {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "rm -rf /", "gen_ai.tool.call.id": "call_1",
        "gen_ai.tool.type": "function", "error.type": "tool_error"}


async def test_a_model_failure_marks_the_chat_and_the_task(tmp_path: Path) -> None:
    rig = Rig([LLMError("the model server answered 429", kind="rate_limit")], [])
    result = await rig.run(tmp_path)

    assert result.error_kind == "llm_rate_limit"
    chat = rig.span("chat gpt-test")
    assert (chat.attributes or {})["error.type"] == "rate_limit"
    assert chat.status.status_code is StatusCode.ERROR
    assert (rig.span("invoke_agent").attributes or {})["error.type"] == "llm_rate_limit"
    assert rig.sample("alex_llm_errors_total", model="gpt-test", error_type="rate_limit") == 1
    assert rig.sample("gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="chat",
                      gen_ai_provider_name="openai", gen_ai_request_model="gpt-test", error_type="rate_limit") == 1


async def test_a_cancelled_task_ends_its_open_spans_as_cancelled(tmp_path: Path) -> None:
    slow = SlowTool()
    rig = Rig([tool_turn(call("slow", {}, "call_1"))], [slow])
    job = asyncio.create_task(rig.run(tmp_path))
    async with asyncio.timeout(10):
        await slow.started.wait()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    for name in ("invoke_agent", "iteration", "execute_tool slow"):
        span = rig.span(name)
        assert (span.attributes or {})["error.type"] == "cancelled", name
        assert span.status.status_code is StatusCode.ERROR
    assert rig.sample("alex_tool_calls_total", tool="slow", outcome="cancelled") == 1


async def test_content_stays_off_spans_unless_asked_for(tmp_path: Path) -> None:
    secret = "the password is hunter2"
    quiet = Rig([tool_turn(call("echo", {"text": secret}, "call_1")), answer(secret)], [EchoTool()])
    await quiet.run(tmp_path, text=secret)
    assert not any(secret in json.dumps(dict(s.attributes or {})) for s in quiet.spans())

    loud = Rig([tool_turn(call("echo", {"text": secret}, "call_1")), answer(secret)], [EchoTool()], content=True)
    await loud.run(tmp_path, text=secret)
    tool: dict[str, Any] = dict(loud.span("execute_tool echo").attributes or {})
    assert json.loads(str(tool["gen_ai.tool.call.arguments"])) == {"text": secret}
    assert tool["gen_ai.tool.call.result"] == secret
    agent_input = json.loads(str((loud.span("invoke_agent").attributes or {})["gen_ai.input.messages"]))
    assert agent_input == [{"role": "user", "content": secret}]
    last_chat = [s for s in loud.spans() if s.name == "chat gpt-test"][-1]
    output = json.loads(str((last_chat.attributes or {})["gen_ai.output.messages"]))
    assert output[0]["content"] == secret
