"""The Locust smoke profile against a real local server: every request answered, no stream missed an event.

Timings are never judged here (a shared CI machine is no place for them): the benchmarks in ``loadtests/`` do that.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.server import SECRET, running

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
SMOKE = ROOT / "loadtests" / "locust" / "smoke.conf"


def test_the_smoke_profile_runs_without_errors_or_gaps(tmp_path: Path) -> None:
    with running() as server:
        finished = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--config", str(SMOKE), "--host",
             server.base_url, "--alex-secret", SECRET, "--csv", str(tmp_path / "smoke")],
            capture_output=True, text=True, timeout=90, cwd=ROOT, check=False)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-3000:]
    with (tmp_path / "smoke_stats.csv").open() as stats:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, output[-3000:]
    assert int(rows[("POST", "/api/tasks")]["Request Count"]) > 0, "the smoke run submitted no task"
    assert int(rows[("SSE", "time to first event")]["Request Count"]) > 0, "no task was followed on a stream"
    tally = next(line for line in output.splitlines() if line.startswith("alex-server:"))
    assert " 0 gaps, 0 duplicates" in tally, tally
