"""Keeping a conversation within the model's budget: oldest turns go first, never the system prompt or the newest turn.

Tokens are estimated (about four characters a token, plus a little per message) rather than counted with a real
tokenizer: exact tokenizers load vocabulary files at run time, which an offline cluster may not have, and a budget
set with some headroom makes the estimate good enough.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.domain.llm import Message

_CHARS_PER_TOKEN = 4
_MESSAGE_OVERHEAD = 4


def estimate_tokens(message: Message) -> int:
    chars = len(message.content)
    for call in message.tool_calls:
        chars += len(call.name) + len(call.arguments) + len(call.id)
    return _MESSAGE_OVERHEAD + (chars + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def _turns(messages: Sequence[Message]) -> list[list[Message]]:
    """Split into turns: each starts at a user message and holds what followed it (answers, tool calls, results).

    Cutting only at turn starts keeps every tool result next to the assistant message that asked for it, which
    the model APIs require.
    """
    turns: list[list[Message]] = []
    for message in messages:
        if message.role == "user" or not turns:
            turns.append([message])
        else:
            turns[-1].append(message)
    return turns


def trim_history(messages: Sequence[Message], budget: int) -> list[Message]:
    """The messages to send: the leading system prompt, then as many of the newest turns as fit in ``budget``.

    The newest turn is always kept whole, even alone over budget: without it the model has nothing to answer.
    """
    head: list[Message] = []
    rest = list(messages)
    if rest and rest[0].role == "system":
        head, rest = [rest[0]], rest[1:]
    turns = _turns(rest)
    if not turns:
        return head
    used = sum(estimate_tokens(m) for m in head)
    kept: list[list[Message]] = [turns[-1]]
    used += sum(estimate_tokens(m) for m in turns[-1])
    for turn in reversed(turns[:-1]):
        cost = sum(estimate_tokens(m) for m in turn)
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    return head + [m for turn in reversed(kept) for m in turn]
