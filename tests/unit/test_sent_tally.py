"""The streams' account: every write counted, added to the metrics once per turn of the loop."""

from __future__ import annotations

import asyncio

from service.api.routes.stream import SentTally
from service.domain.events import StoredEvent, Thinking, ToolCallStream
from service.observability.metrics import Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


async def test_each_write_counts_its_bytes_and_types_and_each_event_one_latency_sample() -> None:
    metrics = Metrics(process=False)
    tally = SentTally(metrics)
    a = StoredEvent.encode(1, Thinking(session_id="s", task_id="t", delta="a"))
    b = StoredEvent.encode(2, Thinking(session_id="s", task_id="t", delta="bb"))
    c = StoredEvent.encode(3, ToolCallStream(session_id="s", task_id="t", tool_name="bash", call_id="c", chunk="x"))
    tally.wrote(a, 3)       # one event written through to three streams
    tally.wrote(b, 2)
    tally.wrote(a)          # the first again, by one more stream: counted, but no second latency sample
    tally.add(c, len(c.frame) + len(a.frame))  # one write of two events, c the oldest
    tally.count("thinking", 1)
    tally.add(c, 2 * len(c.frame), 2)           # two streams, each writing c alone from its own turn
    assert value(metrics, "alex_sse_bytes_sent_total") == 0  # nothing before the end of the turn
    await asyncio.sleep(0)
    assert value(metrics, "alex_sse_bytes_sent_total") == 5 * len(a.frame) + 2 * len(b.frame) + 3 * len(c.frame)
    assert value(metrics, "alex_sse_events_sent_total", event_type="thinking") == 7
    assert value(metrics, "alex_sse_events_sent_total", event_type="tool_call_stream") == 3
    assert value(metrics, "alex_sse_delivery_latency_seconds_count") == 3


async def test_the_next_turn_starts_a_new_account() -> None:
    metrics = Metrics(process=False)
    tally = SentTally(metrics)
    a = StoredEvent.encode(1, Thinking(session_id="s", task_id="t", delta="a"))
    tally.wrote(a, 2)
    await asyncio.sleep(0)
    tally.wrote(a)          # the same event, written by a stream a turn later
    await asyncio.sleep(0)
    assert value(metrics, "alex_sse_bytes_sent_total") == 3 * len(a.frame)
    assert value(metrics, "alex_sse_events_sent_total", event_type="thinking") == 3
    assert value(metrics, "alex_sse_delivery_latency_seconds_count") == 2
