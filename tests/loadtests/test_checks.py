"""The benchmarks' verdicts on what the load clients counted: a run that lost or repeated an event misses its
target, whichever way the counts fall; a sweep holds its other stream counts to losses alone."""

from __future__ import annotations

from typing import Any

from loadtests.common import count_losses
from loadtests.engine import EVENTS_PER_TASK, TaskRun, streamed_whole
from loadtests.fanout import checks

EXPECTED = 1_000


def counted(deliveries: int, gaps: int, **figures: Any) -> dict[str, Any]:
    """A client's result as the load clients report it, accounted by the benchmark."""
    result = {"expected": EXPECTED, "deliveries": deliveries, "gaps": gaps, "errors": [],
              "deliveries_per_second": 100_000.0, "p99_ms": 1.0, **figures}
    return count_losses(result)


def verdict(service: dict[str, Any], *, speed: bool = True) -> dict[str, bool]:
    saturated = {"bare": counted(EXPECTED, 0, deliveries_per_second=120_000.0),
                 "hub": counted(EXPECTED, 0, deliveries_per_second=20_000.0), "service": service}
    return {check.target: check.holds for check in checks(saturated, None, None, speed=speed)}


def test_an_exact_run_holds_every_target() -> None:
    assert verdict(counted(EXPECTED, 0)) == {
        "deliveries/s >= 70% of the bare reference": True,
        "deliveries/s >= 3x the sse-starlette hub": True,
        "p99 delivery latency < 10 ms, as fast as it goes": True,
        "no event lost or repeated": True,
    }


def test_a_repeated_event_is_not_made_up_for_by_a_lost_one() -> None:
    # One event arrived twice and another never: as many deliveries as expected, but two arrivals out of sequence.
    result = counted(EXPECTED, 2)
    assert (result["lost"], result["out_of_order"]) == (0, 2)
    assert verdict(result)["no event lost or repeated"] is False


def test_a_repeat_the_stream_read_past_its_count_is_caught() -> None:
    result = counted(EXPECTED + 1, 1)
    assert (result["lost"], result["out_of_order"]) == (0, 1)
    assert verdict(result)["no event lost or repeated"] is False


def test_missing_events_are_lost() -> None:
    result = counted(EXPECTED - 10, 0)
    assert result["lost"] == 10
    assert verdict(result)["no event lost or repeated"] is False


def test_an_error_fails_the_run_even_with_every_event_counted() -> None:
    assert verdict(counted(EXPECTED, 0, errors=["stream 3: 503"]))["no event lost or repeated"] is False


def test_a_sweeps_other_stream_counts_are_held_to_losses_alone() -> None:
    slow = counted(EXPECTED, 0, deliveries_per_second=10_000.0, p99_ms=50.0)
    assert verdict(slow, speed=False) == {"no event lost or repeated": True}
    assert verdict(counted(EXPECTED - 1, 0), speed=False) == {"no event lost or repeated": False}
    assert not all(verdict(slow).values())


def test_a_task_stream_is_whole_with_every_event_once_in_order() -> None:
    ids = list(range(101, 101 + EVENTS_PER_TASK))
    assert streamed_whole(TaskRun("s", 0.0, ids=ids))
    assert not streamed_whole(TaskRun("s", 0.0, ids=ids[:-1]))
    repeated = [*ids[:10], ids[9], *ids[10:-1]]  # as many as expected, one twice and the last one missing
    assert len(repeated) == EVENTS_PER_TASK
    assert not streamed_whole(TaskRun("s", 0.0, ids=repeated))
    swapped = [*ids[:5], ids[6], ids[5], *ids[7:]]
    assert not streamed_whole(TaskRun("s", 0.0, ids=swapped))
