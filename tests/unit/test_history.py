"""trim_history: what of a long conversation is sent to the model."""

from __future__ import annotations

from service.domain.history import estimate_tokens, trim_history
from service.domain.llm import Message, ToolCall

SYSTEM = Message("system", "You are a test.")


def user(text: str = "question", size: int = 40) -> Message:
    return Message("user", text.ljust(size, "."))


def reply(text: str = "answer", size: int = 40) -> Message:
    return Message("assistant", text.ljust(size, "."))


def tool_exchange(call_id: str, result_size: int = 40) -> list[Message]:
    """An assistant message asking for one tool call, and the tool's result."""
    return [
        Message("assistant", "", (ToolCall(call_id, "bash", '{"command": "ls"}'),)),
        Message("tool", "r" * result_size, tool_call_id=call_id, name="bash"),
    ]


def cost(messages: list[Message]) -> int:
    return sum(estimate_tokens(m) for m in messages)


def turn(number: int, size: int = 40) -> list[Message]:
    return [user(f"question {number}", size), reply(f"answer {number}", size)]


def assert_consistent(sent: list[Message], messages: list[Message]) -> None:
    """The invariants of any trim: the system prompt first, then an unbroken run of the newest whole turns."""
    if messages and messages[0].role == "system":
        assert sent[0] == messages[0]
        tail = sent[1:]
    else:
        tail = sent
    assert tail == messages[len(messages) - len(tail):]
    if tail and len(tail) < len(messages) - (messages[0].role == "system"):
        assert tail[0].role == "user", "a cut must fall at the start of a turn"
    calls = {c.id for m in tail for c in m.tool_calls}
    assert all(m.tool_call_id in calls for m in tail if m.role == "tool"), "a tool result lost its call"


def test_everything_is_kept_under_the_budget() -> None:
    messages = [SYSTEM, *turn(1), *turn(2), user("now")]
    assert trim_history(messages, cost(messages)) == messages
    assert trim_history(messages, 100_000) == messages


def test_the_oldest_turns_go_first() -> None:
    messages = [SYSTEM, *turn(1), *turn(2), *turn(3), user("now")]
    budget = cost([SYSTEM, *turn(3), user("now")])

    sent = trim_history(messages, budget)

    assert sent == [SYSTEM, *turn(3), user("now")]


def test_one_token_short_drops_one_more_turn() -> None:
    messages = [SYSTEM, *turn(1), *turn(2), user("now")]
    assert trim_history(messages, cost(messages) - 1) == [SYSTEM, *turn(2), user("now")]


def test_the_system_prompt_and_the_newest_turn_stay_whole_over_the_budget() -> None:
    newest = [user("now", 4000), *tool_exchange("call_1", 4000), reply("done", 4000)]
    messages = [SYSTEM, *turn(1), *newest]

    assert trim_history(messages, 0) == [SYSTEM, *newest]
    assert trim_history(messages, cost([SYSTEM, *newest]) - 1) == [SYSTEM, *newest]


def test_a_tool_call_and_its_results_are_never_split() -> None:
    # The middle turn would fit in part (its user message and tool call) but not whole.
    middle = [user("list"), *tool_exchange("call_1", 2000), reply("listed")]
    messages = [SYSTEM, *turn(1), *middle, user("now")]
    budget = cost([SYSTEM, user("now"), *middle[:2]]) + 10

    sent = trim_history(messages, budget)

    assert sent == [SYSTEM, user("now")]


def test_every_budget_gives_a_consistent_window() -> None:
    messages = [
        SYSTEM,
        *turn(1),
        user("two"), *tool_exchange("call_a"), *tool_exchange("call_b", 300), reply("two done"),
        *turn(3, 200),
        user("four"), *tool_exchange("call_c"),
    ]
    sizes = set()
    for budget in range(cost(messages) + 2):
        sent = trim_history(messages, budget)
        assert_consistent(sent, messages)
        sizes.add(len(sent))
    assert len(sizes) == 4, "each of the four turns is dropped at some budget"


def test_a_turn_that_does_not_fit_also_drops_every_older_one() -> None:
    # A gap in the middle of the history would show the model answers to questions it never saw.
    messages = [SYSTEM, *turn(1, 4), *turn(2, 4000), user("now")]
    sent = trim_history(messages, cost([SYSTEM, *turn(1, 4), user("now")]))
    assert sent == [SYSTEM, user("now")]


def test_without_a_system_prompt() -> None:
    messages = [*turn(1), *turn(2), user("now")]
    assert trim_history(messages, cost([*turn(2), user("now")])) == [*turn(2), user("now")]
    assert trim_history(messages, 0) == [user("now")]


def test_a_system_message_later_on_is_part_of_its_turn() -> None:
    messages = [SYSTEM, *turn(1), Message("system", "note"), user("now")]
    assert trim_history(messages, 100_000) == messages


def test_empty_and_system_only() -> None:
    assert trim_history([], 0) == []
    assert trim_history([SYSTEM], 0) == [SYSTEM]


def test_the_input_is_not_changed() -> None:
    messages = [SYSTEM, *turn(1), *turn(2), user("now")]
    before = list(messages)
    sent = trim_history(messages, 0)
    assert messages == before
    assert sent is not messages


def test_the_estimate_counts_tool_calls_and_grows_with_the_text() -> None:
    plain = Message("assistant", "")
    with_call = Message("assistant", "", (ToolCall("call_1", "bash", '{"command": "ls -la /tmp"}'),))
    assert estimate_tokens(with_call) > estimate_tokens(plain) > 0
    assert estimate_tokens(Message("user", "x" * 400)) > estimate_tokens(Message("user", "x" * 40))
