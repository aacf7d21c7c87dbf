"""The mock model: its default tool-driving flow, its token stream, its scripts, and the adapter choice."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from service.adapters.llm import MockChatModel, OpenAIChatModel, build_chat_model
from service.adapters.llm.mock import MockScript, tokens, turn_of
from service.config import Settings
from service.domain.llm import ChatResponse, LLMError, Message, ToolCall, ToolSpec

OBJECT: dict[str, Any] = {"type": "object"}
BASH = ToolSpec("bash", "Run a shell command.", OBJECT)
LIST_FILES = ToolSpec("list_files", "List a folder.", OBJECT)
TOOLS = (BASH, LIST_FILES)


class Sink:
    """Collects the deltas ``chat`` streams, with the time each one arrived."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.times: list[float] = []

    async def __call__(self, delta: str) -> None:
        self.deltas.append(delta)
        self.times.append(time.monotonic())


async def chat(
    model: MockChatModel, messages: Sequence[Message], tools: Sequence[ToolSpec] = TOOLS
) -> tuple[ChatResponse, Sink]:
    sink = Sink()
    response = await model.chat(messages, tools, sink)
    return response, sink


def after_tool(task: str, call: ToolCall, result: str, *, named: bool = True) -> list[Message]:
    """A task whose first turn asked for ``call`` and got ``result`` back."""
    return [
        Message("system", "You are a helpful agent."),
        Message("user", task),
        Message("assistant", "Looking.", tool_calls=(call,)),
        Message("tool", result, tool_call_id=call.id, name=call.name if named else None),
    ]


def settings(**values: Any) -> Settings:
    return Settings(**values)


# The default flow


async def test_first_turn_lists_the_workspace() -> None:
    response, sink = await chat(MockChatModel(), [Message("user", "What is in my project?")])
    assert response.content == "Let me look at the workspace first."
    assert [(call.name, json.loads(call.arguments)) for call in response.tool_calls] == [("list_files", {"path": "."})]
    assert response.tool_calls[0].id == "call_0_0"
    assert response.finish_reason == "tool_calls"
    assert response.model == "mock"
    assert "".join(sink.deltas) == response.content


async def test_second_turn_answers_from_the_listing() -> None:
    call = ToolCall("call_0_0", "list_files", '{"path": "."}')
    messages = after_tool("What is in my project?", call, "README.md\nsrc/\n\ntests/\n")
    response, sink = await chat(MockChatModel(), messages)
    assert response.tool_calls == ()
    assert response.finish_reason == "stop"
    assert response.content == (
        'You asked: "What is in my project?". The workspace holds 3 entries: README.md, src/, tests/.'
    )
    assert "".join(sink.deltas) == response.content


async def test_a_json_listing_is_read_too() -> None:
    call = ToolCall("call_0_0", "list_files", "{}")
    listing = json.dumps({"entries": [{"name": "a.txt", "type": "file"}, {"name": "docs", "type": "dir"}]})
    # Without the tool's name on the result, the mock finds it from the call id.
    response, _ = await chat(MockChatModel(), after_tool("Look around", call, listing, named=False))
    assert response.content.endswith("The workspace holds 2 entries: a.txt, docs.")


async def test_a_dollar_line_asks_for_bash() -> None:
    task = "Please check the greeting:\n$ echo hi\nthanks"
    response, _ = await chat(MockChatModel(), [Message("user", task)])
    assert response.content == "I'll run `echo hi`."
    assert [(call.name, json.loads(call.arguments)) for call in response.tool_calls] == [
        ("bash", {"command": "echo hi"})
    ]


async def test_the_run_phrase_asks_for_bash() -> None:
    response, _ = await chat(MockChatModel(), [Message("user", "Could you run: `ls -la` please")])
    assert response.content == "I'll run `ls -la`."
    assert json.loads(response.tool_calls[0].arguments) == {"command": "ls -la"}


async def test_the_run_phrase_takes_the_rest_of_its_line() -> None:
    response, _ = await chat(MockChatModel(), [Message("user", "Now run: uname -a\nand tell me")])
    assert json.loads(response.tool_calls[0].arguments) == {"command": "uname -a"}


async def test_bash_output_is_quoted_and_shortened() -> None:
    call = ToolCall("call_0_0", "bash", '{"command": "echo hi"}')
    response, _ = await chat(MockChatModel(), after_tool("$ echo hi", call, "hi\n"))
    assert response.content == 'You asked: "$ echo hi". The command printed:\nhi'

    long_output = "x" * 2000
    response, _ = await chat(MockChatModel(), after_tool("$ yes x", call, long_output))
    quoted = response.content.split("The command printed:\n", 1)[1]
    assert 400 <= len(quoted) <= 500
    assert quoted.endswith("…")


async def test_without_bash_a_command_falls_back_to_listing() -> None:
    response, _ = await chat(MockChatModel(), [Message("user", "$ rm -rf /")], tools=[LIST_FILES])
    assert [call.name for call in response.tool_calls] == ["list_files"]


async def test_without_tools_it_answers_at_once() -> None:
    response, _ = await chat(MockChatModel(), [Message("user", "Say hello")], tools=[])
    assert response.tool_calls == ()
    assert response.content.startswith('You asked: "Say hello".')


async def test_each_new_task_starts_over_at_turn_zero() -> None:
    call = ToolCall("call_0_0", "list_files", "{}")
    history = [*after_tool("First task", call, "a"), Message("assistant", "Done with that.")]
    messages = [*history, Message("user", "Second task")]
    assert turn_of(messages) == 0
    response, _ = await chat(MockChatModel(), messages)
    assert [call.name for call in response.tool_calls] == ["list_files"]


async def test_the_same_conversation_gets_the_same_answer() -> None:
    call = ToolCall("call_0_0", "bash", '{"command": "date"}')
    messages = after_tool("$ date", call, "Thu Jan  1 00:00:00 UTC 1970")
    first, _ = await chat(MockChatModel(), messages)
    second, _ = await chat(MockChatModel(), messages)
    assert first == second
    assert first.usage.prompt_tokens > 0
    assert first.usage.completion_tokens > 0


# The token stream


@pytest.mark.parametrize(
    "text",
    ["", "one", "  leading and trailing  ", "lines\nand\ttabs\n\n  indented", "a  b   c", "\n"],
)
def test_tokens_join_to_the_text(text: str) -> None:
    assert "".join(tokens(text)) == text
    assert all(token.strip() for token in tokens(text)[:-1])


async def test_one_delta_per_token_and_they_join_to_the_text() -> None:
    text = "Here is a longer answer,\nwith  odd   spacing and\ta tab. " * 5
    model = MockChatModel(script=[{"text": text}])
    response, sink = await chat(model, [Message("user", "go")])
    assert "".join(sink.deltas) == text == response.content
    assert len(sink.deltas) == len(tokens(text))


async def test_a_delay_spreads_the_deltas() -> None:
    model = MockChatModel(delay_ms=20, script=[{"text": "one two three four five six"}])
    _, sink = await chat(model, [Message("user", "go")])
    assert len(sink.deltas) == 6
    # A lower bound only: a slow machine spreads them more, never less.
    assert sink.times[-1] - sink.times[0] >= 5 * 0.020 * 0.5


async def test_a_turn_delay_overrides_the_model_delay() -> None:
    model = MockChatModel(delay_ms=0, script=[{"text": "a b c d", "delay_ms": 25}])
    _, sink = await chat(model, [Message("user", "go")])
    assert sink.times[-1] - sink.times[0] >= 3 * 0.025 * 0.5


# Scripts


SCRIPT: list[dict[str, Any]] = [
    {"text": "Listing.", "tool_calls": [{"name": "bash", "arguments": {"command": "ls"}}]},
    {
        "text": "Two at once.",
        "tool_calls": [
            {"name": "read_file", "arguments": {"path": "a.txt"}},
            {"name": "bash", "arguments": "{not json"},
        ],
    },
    {"text": "All done."},
]


def conversation(turns: int) -> list[Message]:
    """A task with ``turns`` assistant turns behind it."""
    messages = [Message("user", "do it")]
    for turn in range(turns):
        call = ToolCall(f"call_{turn}_0", "bash", "{}")
        messages += [Message("assistant", "", tool_calls=(call,)), Message("tool", "out", tool_call_id=call.id)]
    return messages


async def test_a_script_plays_its_turns_in_order() -> None:
    model = MockChatModel(script=SCRIPT)
    first, _ = await chat(model, conversation(0))
    assert first.content == "Listing."
    assert first.tool_calls == (ToolCall("call_0_0", "bash", '{"command": "ls"}'),)

    second, _ = await chat(model, conversation(1))
    assert [(call.id, call.name) for call in second.tool_calls] == [("call_1_0", "read_file"), ("call_1_1", "bash")]
    assert second.tool_calls[1].arguments == "{not json"

    third, _ = await chat(model, conversation(2))
    assert (third.content, third.tool_calls, third.finish_reason) == ("All done.", (), "stop")


async def test_past_the_script_it_says_done() -> None:
    response, _ = await chat(MockChatModel(script=SCRIPT), conversation(7))
    assert (response.content, response.tool_calls) == ("Done.", ())


async def test_a_script_restarts_with_every_task() -> None:
    messages = [*conversation(2), Message("assistant", "All done."), Message("user", "again")]
    response, _ = await chat(MockChatModel(script=SCRIPT), messages)
    assert response.content == "Listing."


async def test_an_error_turn_streams_its_text_then_raises() -> None:
    model = MockChatModel(script=[{"text": "Thinking hard", "error": {"kind": "rate_limit", "message": "slow down"}}])
    sink = Sink()
    with pytest.raises(LLMError, match="slow down") as caught:
        await model.chat([Message("user", "go")], TOOLS, sink)
    assert caught.value.kind == "rate_limit"
    assert "".join(sink.deltas) == "Thinking hard"


async def test_a_script_file_is_loaded_from_settings(tmp_path: Path) -> None:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"turns": SCRIPT}))
    model = build_chat_model(settings(llm_provider="mock", mock_script=path, mock_delay_ms=0))
    assert isinstance(model, MockChatModel)
    response, _ = await chat(model, conversation(0))
    assert response.content == "Listing."
    await model.aclose()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"turns": {}}', "list of turns"),
        ('{"turns": [], "extra": 1}', "unknown key 'extra'"),
        ('{"turns": ["hello"]}', r"turns\[0\] must be an object"),
        ('{"turns": [{"txt": "typo"}]}', r"turns\[0\]: unknown key 'txt'"),
        ('{"turns": [{"text": 3}]}', r"turns\[0\]\.text must be a string"),
        ('{"turns": [{"delay_ms": -1}]}', r"turns\[0\]\.delay_ms"),
        ('{"turns": [{"tool_calls": [{"arguments": {}}]}]}', r"turns\[0\]\.tool_calls\[0\]\.name"),
        ('{"turns": [{"tool_calls": [{"name": "bash", "arguments": 5}]}]}', r"\.arguments must be"),
        ('{"turns": [{"error": {"kind": "oops"}}]}', r"turns\[0\]\.error\.kind must be one of"),
        (
            '{"turns": [{"error": {}, "tool_calls": [{"name": "bash"}]}]}',
            "either tool_calls or an error",
        ),
    ],
)
def test_a_bad_script_file_is_refused_with_its_name_and_problem(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as caught:
        MockChatModel.from_settings(settings(mock_script=path))
    assert str(path) in str(caught.value)


def test_a_missing_script_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ValueError, match="cannot be read") as caught:
        MockScript.load(path)
    assert str(path) in str(caught.value)


def test_turns_given_in_code_are_checked_too() -> None:
    with pytest.raises(ValueError, match=r"turns\[1\]\.text"):
        MockChatModel(script=[{"text": "fine"}, {"text": None}])


# The choice of adapter


async def test_the_provider_picks_the_adapter() -> None:
    assert isinstance(build_chat_model(settings(llm_provider="mock")), MockChatModel)
    model = build_chat_model(settings(llm_provider="openai", base_url="http://127.0.0.1:9/v1", llm_model="m1"))
    assert isinstance(model, OpenAIChatModel)
    assert model.model == "m1"
    await model.aclose()
