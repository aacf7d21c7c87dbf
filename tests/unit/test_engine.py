"""The ReAct engine with a scripted model and fake tools: event order, the conversation, failures, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from service.domain.engine import EngineConfig, Outcome, ReactEngine, TaskRequest, TaskResult
from service.domain.events import (
    ErrorEvent,
    IterationComplete,
    TaskAnalysis,
    TaskComplete,
    ThinkComplete,
    Thinking,
    ToolCallComplete,
    ToolCallStart,
    ToolCallStream,
)
from service.domain.llm import LLMError, Message, Usage
from service.domain.tools import Tool, ToolContext, ToolRegistry
from tests.unit.fakes import (
    CrashingTool,
    EchoTool,
    FailingTool,
    Gated,
    MemoryTodoList,
    RecordingSink,
    ScriptedModel,
    SlowTool,
    Turn,
    answer,
    call,
    tool_turn,
)

SESSION = "s_engine"
TASK = "t_engine"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class ManualClock:
    """A monotonic clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ClockTool:
    """Moves the engine's clock ``seconds`` forward while it runs, as if it took that long."""

    description = "Takes a while, on the test's clock."
    parameters: Mapping[str, Any] = MappingProxyType({"type": "object", "properties": {}})

    def __init__(self, clock: ManualClock, seconds: float) -> None:
        self.name = "tick"
        self._clock = clock
        self._seconds = seconds

    async def run(self, arguments: Mapping[str, Any], context: ToolContext) -> str:
        self._clock.now += self._seconds
        return "ticked"


def make_engine(
    model: ScriptedModel, tools: Iterable[Tool] = (), clock: ManualClock | None = None, **config: Any
) -> ReactEngine:
    return ReactEngine(model, ToolRegistry(tools), EngineConfig(**config), clock or ManualClock())


def make_request(text: str = "list the files", task_id: str = TASK) -> TaskRequest:
    return TaskRequest(session_id=SESSION, task_id=task_id, text=text, trace_id=TRACE)


async def run_task(
    engine: ReactEngine,
    tmp_path: Path,
    *,
    sink: RecordingSink | None = None,
    conversation: list[Message] | None = None,
    request: TaskRequest | None = None,
) -> tuple[TaskResult, RecordingSink, list[Message]]:
    sink = sink if sink is not None else RecordingSink()
    conversation = conversation if conversation is not None else []
    # A guard, not a timing assertion: a hung engine fails this test instead of the whole run.
    async with asyncio.timeout(10):
        result = await engine.run(request or make_request(), conversation, sink, workspace=tmp_path,
                                  todos=MemoryTodoList())
    return result, sink, conversation


def two_iteration_script() -> list[Turn]:
    return [
        tool_turn(
            call("echo", {"text": "a.txt"}, "call_1"),
            call("echo", {"text": "b.txt"}, "call_2"),
            content="Let me look.",
            prompt_tokens=100,
            completion_tokens=20,
        ),
        answer("There are two files.", prompt_tokens=150, completion_tokens=10),
    ]


def without_repeats(types: list[str]) -> list[str]:
    """``types`` with each run of one type (the thinking deltas) written once."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def tool_messages(conversation: list[Message]) -> dict[str, Message]:
    return {m.tool_call_id: m for m in conversation if m.role == "tool" and m.tool_call_id is not None}


def assert_every_call_answered(conversation: list[Message]) -> None:
    """What the model APIs require: every tool call of an assistant message has its tool message after it."""
    for index, message in enumerate(conversation):
        later = tool_messages(conversation[index + 1:])
        for tool_call in message.tool_calls:
            assert tool_call.id in later, f"tool call {tool_call.id} has no result"


# The happy path ----------------------------------------------------------------------------------------------------


async def test_two_iterations_emit_every_step_in_order(tmp_path: Path) -> None:
    result, sink, _ = await run_task(make_engine(ScriptedModel(two_iteration_script()), [EchoTool()]), tmp_path)

    assert without_repeats(sink.types) == [
        "task_analysis",
        "iteration_start", "thinking", "think_complete",
        "tool_call_start", "tool_call_complete", "tool_call_start", "tool_call_complete",
        "iteration_complete",
        "iteration_start", "thinking", "think_complete", "iteration_complete",
        "task_complete",
    ]
    assert result.outcome is Outcome.COMPLETED
    assert result.final_answer == "There are two files."
    assert result.iterations == 2
    assert result.error is None


async def test_every_event_carries_the_envelope_and_its_iteration(tmp_path: Path) -> None:
    _, sink, _ = await run_task(make_engine(ScriptedModel(two_iteration_script()), [EchoTool()]), tmp_path)

    assert {(e.session_id, e.task_id, e.trace_id) for e in sink.events} == {(SESSION, TASK, TRACE)}
    analysis, *rest = sink.events
    assert analysis.event_type == "task_analysis"
    assert analysis.iteration is None
    second = rest.index(next(e for e in rest if e.event_type == "iteration_start" and e.iteration == 2))
    assert {e.iteration for e in rest[:second]} == {1}
    assert {e.iteration for e in rest[second:]} == {2}


async def test_task_analysis_names_the_goal(tmp_path: Path) -> None:
    request = make_request("Count the lines of main.py\nand then explain them")
    _, sink, _ = await run_task(make_engine(ScriptedModel([answer()])), tmp_path, request=request)
    [analysis] = sink.of(TaskAnalysis)
    assert analysis.goal == "Count the lines of main.py"
    assert analysis.action_name


async def test_task_analysis_can_be_turned_off(tmp_path: Path) -> None:
    _, sink, _ = await run_task(make_engine(ScriptedModel([answer()]), analyze=False), tmp_path)
    assert sink.types[0] == "iteration_start"
    assert "task_analysis" not in sink.types


async def test_thinking_deltas_join_to_the_content(tmp_path: Path) -> None:
    model = ScriptedModel(two_iteration_script(), deltas=4)
    _, sink, _ = await run_task(make_engine(model, [EchoTool()]), tmp_path)

    for iteration in (1, 2):
        deltas = [e.delta for e in sink.of(Thinking) if e.iteration == iteration]
        [complete] = [e for e in sink.of(ThinkComplete) if e.iteration == iteration]
        assert len(deltas) > 1
        assert "".join(deltas) == complete.content
    first, second = sink.of(ThinkComplete)
    assert first.content == "Let me look."
    assert first.tool_calls == [{"call_id": "call_1", "tool_name": "echo"}, {"call_id": "call_2", "tool_name": "echo"}]
    assert second.tool_calls == []


async def test_an_empty_text_emits_no_thinking(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("echo", {"text": "x"})), answer("ok")])
    _, sink, _ = await run_task(make_engine(model, [EchoTool()]), tmp_path)
    assert {e.iteration for e in sink.of(Thinking)} == {2}
    assert all(e.delta for e in sink.of(Thinking))


async def test_tool_events_carry_the_call_and_its_result(tmp_path: Path) -> None:
    echo = EchoTool()
    _, sink, _ = await run_task(make_engine(ScriptedModel(two_iteration_script()), [echo]), tmp_path)

    starts = sink.of(ToolCallStart)
    completes = sink.of(ToolCallComplete)
    assert [(s.tool_name, s.call_id, dict(s.arguments)) for s in starts] == [
        ("echo", "call_1", {"text": "a.txt"}),
        ("echo", "call_2", {"text": "b.txt"}),
    ]
    assert [(c.call_id, c.result, c.error) for c in completes] == [("call_1", "a.txt", None), ("call_2", "b.txt", None)]
    assert echo.calls == [{"text": "a.txt"}, {"text": "b.txt"}]
    assert {(ctx.session_id, ctx.workspace) for ctx in echo.contexts} == {(SESSION, tmp_path)}


async def test_tool_output_streams_as_tool_call_stream_events(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("echo", {"text": "hello world"}, "call_9")), answer()])
    _, sink, _ = await run_task(make_engine(model, [EchoTool(stream=True)]), tmp_path)

    streams = sink.of(ToolCallStream)
    assert "".join(s.chunk for s in streams) == "hello world"
    assert {(s.tool_name, s.call_id, s.iteration) for s in streams} == {("echo", "call_9", 1)}
    start, complete = sink.types.index("tool_call_start"), sink.types.index("tool_call_complete")
    assert all(start < sink.events.index(s) < complete for s in streams)


async def test_tool_results_go_back_to_the_model_as_tool_messages(tmp_path: Path) -> None:
    model = ScriptedModel(two_iteration_script())
    _, _, conversation = await run_task(make_engine(model, [EchoTool()], system_prompt="Be brief."), tmp_path)

    assert [m.role for m in conversation] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert conversation[0].content == "Be brief."
    assert conversation[1].content == "list the files"
    assert [c.id for c in conversation[2].tool_calls] == ["call_1", "call_2"]
    second_request = model.requests[1]
    assert second_request == conversation[:5]
    sent = [(m.tool_call_id, m.name, m.content) for m in second_request if m.role == "tool"]
    assert sent == [("call_1", "echo", "a.txt"), ("call_2", "echo", "b.txt")]
    assert conversation[-1] == Message("assistant", "There are two files.")


async def test_the_model_is_told_the_tools(tmp_path: Path) -> None:
    model = ScriptedModel([answer()])
    await run_task(make_engine(model, [EchoTool(), FailingTool()]), tmp_path)
    [specs] = model.tools
    assert [(s.name, s.description) for s in specs] == [("echo", EchoTool.description), ("fail", "Always fails.")]
    assert specs[0].parameters == EchoTool.parameters


async def test_a_second_task_continues_the_conversation(tmp_path: Path) -> None:
    model = ScriptedModel([answer("first answer"), answer("second answer")])
    engine = make_engine(model)
    conversation: list[Message] = []
    await run_task(engine, tmp_path, conversation=conversation, request=make_request("first question", "t_1"))
    result, _, _ = await run_task(engine, tmp_path, conversation=conversation,
                                  request=make_request("second question", "t_2"))

    assert result.final_answer == "second answer"
    sent = model.requests[1]
    assert [(m.role, m.content) for m in sent[1:]] == [
        ("user", "first question"),
        ("assistant", "first answer"),
        ("user", "second question"),
    ]
    assert [m.role for m in conversation].count("system") == 1


async def test_an_old_turn_over_the_budget_is_not_sent_but_is_kept(tmp_path: Path) -> None:
    model = ScriptedModel([answer("short")])
    conversation = [Message("system", "sys"), Message("user", "old " * 2000), Message("assistant", "old answer")]
    _, _, conversation = await run_task(make_engine(model, context_tokens=1000), tmp_path, conversation=conversation)

    assert [m.content for m in model.requests[0]] == ["sys", "list the files"]
    assert len(conversation) == 5


async def test_usage_is_totalled_over_the_iterations(tmp_path: Path) -> None:
    result, sink, _ = await run_task(make_engine(ScriptedModel(two_iteration_script()), [EchoTool()]), tmp_path)

    assert result.usage == Usage(prompt_tokens=250, completion_tokens=30)
    assert [e.tokens_used for e in sink.of(IterationComplete)] == [120, 160]
    [complete] = sink.of(TaskComplete)
    assert complete.total_tokens == 280
    assert complete.total_iterations == 2
    assert complete.final_answer == "There are two files."


async def test_durations_come_from_the_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    model = ScriptedModel([tool_turn(call("tick", {}, "call_1")), answer()])
    result, sink, _ = await run_task(make_engine(model, [ClockTool(clock, 1.5)], clock=clock), tmp_path)

    [complete] = sink.of(ToolCallComplete)
    assert complete.duration == 1500
    [task_complete] = sink.of(TaskComplete)
    assert task_complete.duration == result.duration_ms == 1500


# Tool failures -----------------------------------------------------------------------------------------------------


async def test_a_tool_error_goes_to_the_model_and_the_loop_goes_on(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("fail", {}, "call_1")), answer("I could not read it.")])
    result, sink, conversation = await run_task(make_engine(model, [FailingTool(message="no such file")]), tmp_path)

    [complete] = sink.of(ToolCallComplete)
    assert complete.error == "no such file"
    assert complete.result == ""
    assert tool_messages(model.requests[1])["call_1"].content == "Error: no such file"
    assert result.outcome is Outcome.COMPLETED
    assert sink.types[-1] == "task_complete"
    assert_every_call_answered(conversation)


async def test_a_crashing_tool_goes_to_the_model_and_the_loop_goes_on(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("crash", {}, "call_1"), call("echo", {"text": "still"}, "call_2")),
                           answer("ok")])
    result, sink, _ = await run_task(make_engine(model, [CrashingTool(message="boom"), EchoTool()]), tmp_path)

    first, second = sink.of(ToolCallComplete)
    assert first.error is not None
    assert "RuntimeError: boom" in first.error
    assert (second.result, second.error) == ("still", None)
    sent = tool_messages(model.requests[1])
    assert sent["call_1"].content.startswith("Error: ")
    assert "boom" in sent["call_1"].content
    assert sent["call_2"].content == "still"
    assert result.outcome is Outcome.COMPLETED


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("echo", "{not json", "arguments are not valid JSON"),
        ("echo", '{"text": NaN}', "arguments are not valid JSON"),
        ("echo", "[1, 2]", "arguments must be a JSON object"),
        ("echo", "{}", "invalid arguments: arguments.text is required"),
        ("echo", '{"text": 3}', "invalid arguments: arguments.text must be of type string"),
        ("nope", "{}", "there is no tool named 'nope'; the tools are: echo"),
    ],
)
async def test_a_bad_call_is_an_error_for_the_model_and_runs_nothing(
    tmp_path: Path, name: str, arguments: str, expected: str
) -> None:
    echo = EchoTool()
    model = ScriptedModel([tool_turn(call(name, arguments, "call_1")), answer("sorry")])
    result, sink, _ = await run_task(make_engine(model, [echo]), tmp_path)

    [complete] = sink.of(ToolCallComplete)
    assert complete.error is not None
    assert complete.error.startswith(expected)
    assert tool_messages(model.requests[1])["call_1"].content == f"Error: {complete.error}"
    assert echo.calls == []
    assert result.outcome is Outcome.COMPLETED


async def test_unparsable_arguments_are_shown_raw_in_tool_call_start(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("echo", "{not json", "call_1")), answer()])
    _, sink, _ = await run_task(make_engine(model, [EchoTool()]), tmp_path)
    [start] = sink.of(ToolCallStart)
    assert dict(start.arguments) == {"_raw": "{not json"}


async def test_empty_arguments_mean_no_arguments(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("fail", "", "call_1")), answer()])
    _, sink, _ = await run_task(make_engine(model, [FailingTool(message="ran")]), tmp_path)
    [complete] = sink.of(ToolCallComplete)
    assert complete.error == "ran"


async def test_a_tool_result_is_capped(tmp_path: Path) -> None:
    text = "x" * 25
    model = ScriptedModel([tool_turn(call("echo", {"text": text}, "call_1")), answer()])
    _, sink, _ = await run_task(make_engine(model, [EchoTool()], tool_result_limit=10), tmp_path)

    capped = "x" * 10 + "\n[truncated: 15 more characters]"
    [complete] = sink.of(ToolCallComplete)
    assert complete.result == capped
    assert tool_messages(model.requests[1])["call_1"].content == capped


async def test_a_tool_error_is_capped(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("fail", {}, "call_1")), answer()])
    _, sink, _ = await run_task(make_engine(model, [FailingTool(message="e" * 30)], tool_result_limit=10), tmp_path)
    [complete] = sink.of(ToolCallComplete)
    assert complete.error == "e" * 10 + "\n[truncated: 20 more characters]"


# The task failing --------------------------------------------------------------------------------------------------


async def test_running_out_of_iterations_fails_with_an_error_event(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("echo", {"text": str(n)}, f"call_{n}"), prompt_tokens=5) for n in range(3)])
    result, sink, conversation = await run_task(make_engine(model, [EchoTool()], max_iterations=3), tmp_path)

    assert result.outcome is Outcome.FAILED
    assert result.error_kind == "max_iterations"
    assert result.iterations == 3
    assert result.final_answer is None
    assert result.usage == Usage(15, 0)
    assert result.error is not None
    assert "3 iterations" in result.error
    assert sink.types[-1] == "error"
    [error] = sink.of(ErrorEvent)
    assert (error.error, error.recoverable, error.iteration) == (result.error, False, 3)
    assert "task_complete" not in sink.types
    assert model.remaining == 0
    assert_every_call_answered(conversation)


async def test_a_model_failure_fails_the_task_with_an_error_event(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("echo", {"text": "x"}), prompt_tokens=7),
                           LLMError("upstream timed out", kind="timeout")])
    result, sink, _ = await run_task(make_engine(model, [EchoTool()]), tmp_path)

    assert result.outcome is Outcome.FAILED
    assert result.error_kind == "llm_timeout"
    assert result.iterations == 2
    assert result.usage == Usage(7, 0)
    assert result.error is not None
    assert "upstream timed out" in result.error
    assert sink.types[-1] == "error"
    [error] = sink.of(ErrorEvent)
    assert error.error == result.error
    assert error.recoverable is False
    assert "task_complete" not in sink.types


async def test_a_model_failure_on_the_first_turn_leaves_the_task_text_in_the_conversation(tmp_path: Path) -> None:
    model = ScriptedModel([LLMError("refused", kind="bad_request")])
    result, _, conversation = await run_task(make_engine(model), tmp_path)
    assert result.error_kind == "llm_bad_request"
    assert [m.role for m in conversation] == ["system", "user"]


# Cancellation ------------------------------------------------------------------------------------------------------


async def test_cancelling_while_the_model_thinks_stops_at_once(tmp_path: Path) -> None:
    model = ScriptedModel([Gated(asyncio.Event())])
    sink = RecordingSink()
    conversation: list[Message] = []
    run = asyncio.create_task(run_task(make_engine(model), tmp_path, sink=sink, conversation=conversation))
    await model.until_parked()

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert model.cancelled == 1
    assert "task_complete" not in sink.types
    assert "error" not in sink.types
    assert sink.types[-1] == "iteration_start"
    assert [m.role for m in conversation] == ["system", "user"]


async def test_cancelling_a_tool_stops_it_and_answers_every_call(tmp_path: Path) -> None:
    slow = SlowTool()
    model = ScriptedModel([
        tool_turn(call("echo", {"text": "before"}, "call_1"), call("slow", {}, "call_2"),
                  call("echo", {"text": "after"}, "call_3")),
    ])
    sink = RecordingSink()
    conversation: list[Message] = []
    run = asyncio.create_task(run_task(make_engine(model, [EchoTool(), slow]), tmp_path, sink=sink,
                                       conversation=conversation))
    await slow.started.wait()

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert slow.cancelled
    assert_every_call_answered(conversation)
    answered = tool_messages(conversation)
    assert answered["call_1"].content == "before"
    assert answered["call_2"].content.startswith("Error: ")
    assert "cancel" in answered["call_2"].content
    assert answered["call_3"].content == answered["call_2"].content
    assert [m.tool_call_id for m in conversation if m.role == "tool"] == ["call_1", "call_2", "call_3"]
    assert "task_complete" not in sink.types
    assert [c.call_id for c in sink.of(ToolCallComplete)] == ["call_1"]


async def test_cancelling_while_the_sink_records_the_turn_leaves_every_call_answered(tmp_path: Path) -> None:
    model = ScriptedModel([tool_turn(call("echo", {"text": "x"}, "call_1"))])
    sink = RecordingSink(hold="think_complete")
    conversation: list[Message] = []
    run = asyncio.create_task(run_task(make_engine(model, [EchoTool()]), tmp_path, sink=sink,
                                       conversation=conversation))
    await sink.held.wait()

    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run

    assert_every_call_answered(conversation)
