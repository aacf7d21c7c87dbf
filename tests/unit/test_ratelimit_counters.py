"""The in-process rate-limit counters: the fixed window of ``limits``' in-memory storage, hit for hit, without its
sweeping thread; ended windows are dropped."""

from __future__ import annotations

import threading
import time

import pytest
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from service.api import ratelimit
from service.api.ratelimit import RateLimits, WindowCounters
from service.config import Settings


def test_the_counters_give_the_verdicts_and_windows_of_limits_memory_storage() -> None:
    item = parse("3/second")
    ours = FixedWindowRateLimiter(WindowCounters())
    theirs = FixedWindowRateLimiter(MemoryStorage())
    seen: list[tuple[bool, int]] = []
    for round_ in range(2):
        for _ in range(5):
            for key in ("sub:alice", "sub:bob"):
                allowed = ours.hit(item, "alex:ratelimit", "tasks", key)
                expected = theirs.hit(item, "alex:ratelimit", "tasks", key)
                reset, remaining = ours.get_window_stats(item, "alex:ratelimit", "tasks", key)
                their_reset, their_remaining = theirs.get_window_stats(item, "alex:ratelimit", "tasks", key)
                assert (allowed, remaining) == (expected, their_remaining)
                assert abs(reset - their_reset) < 0.05
                seen.append((allowed, remaining))
        if round_ == 0:
            time.sleep(1.05)  # the windows end: both start new ones
    assert seen[:10] == [(True, 2)] * 2 + [(True, 1)] * 2 + [(True, 0)] * 2 + [(False, 0)] * 4
    assert seen[10:] == seen[:10]


def test_a_window_starts_at_its_first_hit_and_resets_when_it_ends() -> None:
    counters = WindowCounters()
    before = time.time()
    assert counters.incr("k", 60) == 1
    assert counters.incr("k", 60) == 2
    assert before + 60 <= counters.get_expiry("k") <= time.time() + 60
    assert counters.get("k") == 2
    assert counters.incr("short", 0) == 1  # a window of no length has ended by the next look
    assert counters.get("short") == 0
    assert counters.incr("short", 0) == 1


def test_ended_windows_are_dropped_in_passing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "SWEEP_SECONDS", 0.0)
    counters = WindowCounters()
    for number in range(100):
        counters.incr(f"ip:10.0.0.{number}", 0)  # ended at once, never looked at again
    counters.incr("sub:alice", 60)
    assert counters.reset() == 1


async def test_the_in_process_limits_start_no_thread() -> None:
    limits = RateLimits(Settings(rate_limit_tasks="2/minute"))
    before = threading.active_count()
    verdicts = [await limits.hit(limits.tasks, "tasks", "sub:alice") for _ in range(3)]
    assert [(v.allowed, v.limit, v.remaining) for v in verdicts] == [(True, 2, 1), (True, 2, 0), (False, 2, 0)]
    assert threading.active_count() == before
    assert "Retry-After" in verdicts[-1].headers()
