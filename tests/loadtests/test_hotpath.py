"""The in-process delivery-path meter runs the real path and checks itself: every delivery written through.

Only that it runs and what it counts are judged here, never its figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import hotpath

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", hotpath.MODES)
async def test_each_run_measures_a_cost_per_event(mode: str) -> None:
    per_event = await hotpath._rounds(mode, events=300, streams=3, rounds=2)
    assert len(per_event) == 2
    assert all(seconds > 0 for seconds in per_event)


async def test_a_stream_that_is_not_written_through_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hotpath._Flow, "write_paused", True)  # every socket full: events wait for the readers
    with pytest.raises(SystemExit, match="not written through"):
        await hotpath._rounds("deliver", events=200, streams=2, rounds=1)


def test_the_command_prints_the_table() -> None:
    command = [sys.executable, "-m", "loadtests.hotpath", "--rounds", "1", "--streams", "2", "--events", "1000"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert "per delivery (2 streams a session)" in done.stdout
