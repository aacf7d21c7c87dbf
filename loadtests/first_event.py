"""Time to first event: from ``POST /api/tasks`` to the task's first event on a stream already open on its session,
at a steady 50 submissions per second.

    .venv/bin/python -m loadtests.first_event                 # 50 tasks/s for 20 s over 200 open streams

The service runs pinned to one core, as ``alex-server serve`` runs it with its default (offline) model (a task
looks at its workspace and answers, about half a second with the model's default 15 ms a word); the
client, pinned to the other core, opens one stream on each of ``--sessions`` sessions, then submits a task every
``1 / --rate`` seconds to the next session whose previous task has ended (open loop: the schedule does not wait
for the server). For each task the time runs from just before the request is written to the arrival of its
``task_analysis`` frame. Exits 1 unless the p99 is under 20 ms with no task refused or lost.

``ALEX_RATE_LIMIT_TASKS`` and ``ALEX_RATE_LIMIT_DEFAULT`` are raised for the run (a client subject submits more
than the default 10 tasks a minute); everything else is the default configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import uvloop

from loadtests.client import percentile
from loadtests.common import (
    CLIENT_CPU,
    SERVER_CPU,
    Check,
    Child,
    data_folder,
    machine,
    module,
    new_secret,
    report,
    scratch,
    service_environment,
    table,
)
from loadtests.engine import SCOPES, listening_url
from loadtests.streams import OnFrame, open_stream
from service.tokens import mint_token

MAX_P99_MS = 20.0
LIMITS = {"ALEX_RATE_LIMIT_TASKS": "1000000/minute", "ALEX_RATE_LIMIT_DEFAULT": "1000000/minute"}


@dataclass
class Plan:
    url: str
    secret: str
    sessions: int
    rate: float
    seconds: float


class Submitter:
    """The client's state: one stream per session, the first event of each session's task in flight."""

    def __init__(self, plan: Plan, http: httpx.AsyncClient) -> None:
        self.plan = plan
        self.http = http
        self.tokens = [mint_token(plan.secret, f"first-{n:04d}", SCOPES, 3600) for n in range(plan.sessions)]
        self.first: dict[str, asyncio.Future[float]] = {}
        """Per session, the first event of its task in flight (a session runs one task at a time)."""
        self.idle = {self.session(n): asyncio.Event() for n in range(plan.sessions)}
        for event in self.idle.values():
            event.set()
        self.delays: list[float] = []
        self.errors: list[str] = []

    @staticmethod
    def session(n: int) -> str:
        return f"first-{n:04d}"

    def watcher(self, session_id: str) -> OnFrame:
        def on_frame(event: bytes, data: bytes, arrived: float) -> None:
            if event == b"task_analysis":
                waiter = self.first.get(session_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(arrived)
            elif event in (b"task_complete", b"error", b"task_cancelled"):
                self.idle[session_id].set()
        return on_frame

    async def submit(self, n: int) -> None:
        session_id = self.session(n)
        self.idle[session_id].clear()
        waiter = self.first[session_id] = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        try:
            response = await self.http.post("/api/tasks", json={"task": "Look around.", "session_id": session_id},
                                            headers={"Authorization": f"Bearer {self.tokens[n]}"})
            if response.status_code != 202:
                self.errors.append(f"{response.status_code}: {response.text[:120]}")
                self.idle[session_id].set()
                return
            self.delays.append(await asyncio.wait_for(waiter, 30) - started)
        except Exception as exc:  # counted and shown
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self.idle[session_id].set()

    async def schedule(self) -> tuple[int, int, float]:
        """Submit at ``plan.rate`` for ``plan.seconds`` (open loop); returns submitted, skipped, achieved rate."""
        plan = self.plan
        jobs = []
        skipped = cursor = 0
        start = time.monotonic()
        for index in range(int(plan.rate * plan.seconds)):
            await asyncio.sleep(max(0.0, start + index / plan.rate - time.monotonic()))
            for _ in range(plan.sessions):
                cursor = (cursor + 1) % plan.sessions
                if self.idle[self.session(cursor)].is_set():
                    jobs.append(asyncio.create_task(self.submit(cursor)))
                    break
            else:
                skipped += 1
        await asyncio.gather(*jobs)
        return len(jobs), skipped, len(jobs) / (time.monotonic() - start)


async def run_client(plan: Plan) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=plan.url, timeout=30.0, limits=limits) as http:
        submitter = Submitter(plan, http)
        streams = [await open_stream(plan.url, submitter.session(n), submitter.tokens[n],
                                     submitter.watcher(submitter.session(n))) for n in range(plan.sessions)]
        await http.get("/health")
        submitted, skipped, achieved = await submitter.schedule()
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
    ordered = sorted(submitter.delays)
    return {
        "state": "done",
        "submitted": submitted,
        "measured": len(ordered),
        "submissions_per_second": round(achieved, 1),
        "skipped": skipped,
        "p50_ms": round(percentile(ordered, 0.5) * 1000, 2),
        "p90_ms": round(percentile(ordered, 0.9) * 1000, 2),
        "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2) if ordered else float("nan"),
        "errors": submitter.errors[:10],
        "error_count": len(submitter.errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.first_event", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0, help="task submissions per second (default 50)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to submit (default 20)")
    parser.add_argument("--sessions", type=int, default=200, help="open streams, one per session (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder with the server's log")
    args = parser.parse_args(argv)
    with scratch(args.keep) as folder:
        secret = new_secret()
        env = service_environment(data_folder(folder, "first"), secret, **LIMITS)
        with Child(module("service"), log=folder / "first-server.log", env=env, cpu=SERVER_CPU,
                   reads_input=False) as server:
            plan = Plan(listening_url(server), secret, args.sessions, args.rate, args.seconds)
            with Child([*module("loadtests.first_event"), "client", json.dumps(asdict(plan))],
                       log=folder / "first-client.log", cpu=CLIENT_CPU) as client:
                result = client.expect("done", args.seconds + 300)
        if args.keep:
            print(f"  logs kept in {folder}", file=sys.stderr)
    print(f"{result['submitted']} tasks at {result['submissions_per_second']}/s onto {args.sessions} open streams "
          f"(offline model, default settings); {machine()}")
    print()
    print(table(["tasks", "p50 ms", "p90 ms", "p99 ms", "max ms", "refused or lost", "skipped (no idle session)"],
                [(result["measured"], result["p50_ms"], result["p90_ms"], result["p99_ms"], result["max_ms"],
                  result["error_count"], result["skipped"])]))
    return report([
        Check(f"time to first event p99 < {MAX_P99_MS:g} ms at {args.rate:g} submissions/s",
              f"{result['p99_ms']} ms at {result['submissions_per_second']}/s",
              result["p99_ms"] < MAX_P99_MS and result["submissions_per_second"] >= args.rate * 0.95),
        Check("no task refused or lost", f"{result['error_count']} {result['errors'][:2] or ''}",
              result["error_count"] == 0 and result["skipped"] == 0),
    ])


def client_main(config: str) -> None:
    result = uvloop.run(run_client(Plan(**json.loads(config))))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "client":
        client_main(sys.argv[2])
    else:
        sys.exit(main())
