"""Engine overhead: tasks per second on one process, and the service's own time per ReAct iteration, with a model
and tools that cost (next to) nothing.

    .venv/bin/python -m loadtests.engine          # 32 tasks in flight for 3 windows of 10 s, then 100 one by one

The model is the mock, scripted (``ALEX_MOCK_SCRIPT``) with no delay: three turns that each say one word and call
two tools (``list_files`` on the task's empty workspace and ``todo_read``), then an answer: four iterations, six
tool calls and thirty events per task, every one of them stored and streamed to one subscriber per session.

1. Throughput. The service runs pinned to one core, as ``alex-server serve`` runs it; the client, pinned to the
   other core, keeps ``--concurrency`` tasks in flight: each opens a stream on a new session, submits a task there,
   reads its events up to ``task_complete``, and starts over. Tasks per second count the tasks that finished in
   each of ``--windows`` measured windows of ``--seconds``, one after the other; the figure is their median, as
   the fan-out's is the median of its turns (these hosts' speed swings by a tenth or more within a minute, and
   one window is a draw). Every task's stream must hold its thirty events, each once and in order; afterwards the
   first 300 sessions' streamed events are compared with their stored ones, read back through the API.
2. Own time. A second server, exporting its spans to a collector in this process (OTLP/HTTP), runs ``--sequential``
   tasks one at a time. For each ``iteration`` span, the service's own time is its duration minus the ``chat`` and
   ``execute_tool`` spans within it: what is left is everything but the model and the tools (the events, their
   storage and delivery, the conversation, the telemetry itself).

Exits 1 when a target is missed: at least 200 tasks/s, every event stored and streamed, own time per iteration
p50 under 1 ms. ``ALEX_RATE_LIMIT_TASKS`` and ``ALEX_RATE_LIMIT_DEFAULT`` are raised for the run (each client
subject submits far more than the default 10 tasks a minute); everything else is the default configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import json
import re
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import uvloop
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

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
from loadtests.pyspy import Profiler, summary
from loadtests.streams import open_stream
from service.tokens import mint_token

MIN_TASKS_PER_SECOND = 200.0
MAX_OWN_MS_P50 = 1.0
SCOPES = ["tasks:write", "sessions:read", "sessions:write"]
TERMINAL = (b"task_complete", b"error", b"task_cancelled")
EVENTS_PER_TASK = 30
_ID = re.compile(rb'"id":"(\d+)"')
TOOL_TURN = {"text": "Checking.", "tool_calls": [{"name": "list_files", "arguments": {"path": "."}},
                                                 {"name": "todo_read", "arguments": {}}]}
SCRIPT = {"turns": [TOOL_TURN, TOOL_TURN, TOOL_TURN, {"text": "Done."}]}
LIMITS = {"ALEX_RATE_LIMIT_TASKS": "1000000/minute", "ALEX_RATE_LIMIT_DEFAULT": "1000000/minute"}


@dataclass
class ClientPlan:
    url: str
    secret: str
    concurrency: int
    seconds: float
    """Of each measured window."""
    warmup: float
    tasks: int = 0
    """When set, run exactly this many tasks (one at a time per worker) instead of for ``seconds``."""
    verify: int = 300
    windows: int = 1
    """Measured windows of ``seconds`` one after the other; tasks/s is their median."""


@dataclass
class TaskRun:
    session_id: str
    started: float
    finished: float = 0.0
    terminal: str = ""
    ids: list[int] = field(default_factory=list)


async def one_task(http: httpx.AsyncClient, url: str, token: str, session_id: str) -> TaskRun:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    run = TaskRun(session_id, 0.0)

    def on_frame(event: bytes, data: bytes, arrived: float) -> None:
        match = _ID.search(data)
        if match is not None:
            run.ids.append(int(match.group(1)))
        if event in TERMINAL and not done.done():
            run.finished, run.terminal = arrived, event.decode()
            done.set_result(None)

    stream = await open_stream(url, session_id, token, on_frame)
    try:
        run.started = time.monotonic()
        response = await http.post("/api/tasks", json={"task": "benchmark", "session_id": session_id},
                                   headers={"Authorization": f"Bearer {token}"})
        if response.status_code != 202:
            raise RuntimeError(f"submit refused: {response.status_code} {response.text[:200]}")
        await asyncio.wait_for(done, 60)
    finally:
        if stream.transport is not None:
            stream.transport.close()
    return run


async def run_client(plan: ClientPlan) -> dict[str, Any]:
    runs: list[TaskRun] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=plan.concurrency * 2, max_keepalive_connections=plan.concurrency * 2)
    async with httpx.AsyncClient(base_url=plan.url, limits=limits, timeout=60.0) as http:
        started = time.monotonic()
        deadline = started + plan.warmup + plan.seconds * plan.windows
        remaining = plan.tasks

        async def worker(index: int) -> None:
            nonlocal remaining
            token = mint_token(plan.secret, f"engine-{index:03d}", SCOPES, 3600)
            number = 0
            while (time.monotonic() < deadline) if not plan.tasks else remaining > 0:
                remaining -= 1
                number += 1
                try:
                    runs.append(await one_task(http, plan.url, token, f"engine-{index:03d}-{number:05d}"))
                except Exception as exc:  # counted and shown, the run goes on
                    errors.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(worker(n) for n in range(plan.concurrency)))
        measured_from = started + plan.warmup
        counted = [r for r in runs if measured_from <= r.finished <= deadline] if not plan.tasks else runs
        seconds = (plan.seconds * plan.windows if not plan.tasks
                   else max(r.finished for r in runs) - min(r.started for r in runs))
        mismatched = await verify(http, plan, runs[: plan.verify])
    # Each window's rate: a host whose speed swings for a few seconds moves one window, not the median.
    rates = [round(sum(1 for r in counted if edge <= r.finished < edge + plan.seconds) / plan.seconds, 1)
             for edge in (measured_from + n * plan.seconds for n in range(plan.windows))] if not plan.tasks else []
    durations = sorted(r.finished - r.started for r in counted)
    not_whole = [r.session_id for r in runs if not streamed_whole(r)]
    return {
        "state": "done",
        "tasks": len(counted),
        "tasks_run": len(runs),
        "tasks_per_second": statistics.median(rates) if rates else (round(len(counted) / seconds, 1)
                                                                   if seconds > 0 else 0.0),
        "window_rates": rates,
        "events_per_second": round(sum(len(r.ids) for r in counted) / seconds, 1) if seconds > 0 else 0.0,
        "task_p50_ms": round(percentile(durations, 0.5) * 1000, 2),
        "task_p99_ms": round(percentile(durations, 0.99) * 1000, 2),
        "not_completed": sum(1 for r in runs if r.terminal != "task_complete"),
        "events_per_task": sorted({len(r.ids) for r in runs}),
        "not_whole": not_whole[:10],
        "not_whole_count": len(not_whole),
        "verified": min(len(runs), plan.verify),
        "mismatched": mismatched,
        "errors": errors[:10],
        "error_count": len(errors),
    }


def streamed_whole(run: TaskRun) -> bool:
    """Every task's stream, not only the sessions :func:`verify` reads back: its events, each once, in order."""
    ids = run.ids
    return len(ids) == EVENTS_PER_TASK and all(earlier < later for earlier, later in itertools.pairwise(ids))


async def verify(http: httpx.AsyncClient, plan: ClientPlan, runs: list[TaskRun]) -> list[str]:
    """The sessions whose streamed events differ from their stored events (every event stored and streamed)."""
    mismatched: list[str] = []
    for index, run in enumerate(runs):
        token = mint_token(plan.secret, f"engine-{int(run.session_id.split('-')[1]):03d}", SCOPES, 3600)
        response = await http.get(f"/api/sessions/{run.session_id}/events", params={"after": "0", "limit": 1000},
                                  headers={"Authorization": f"Bearer {token}"})
        stored = [int(e["id"]) for e in response.json()["events"]] if response.status_code == 200 else []
        if stored != run.ids or len(stored) != EVENTS_PER_TASK:
            mismatched.append(f"{run.session_id}: streamed {len(run.ids)}, stored {len(stored)} (run {index})")
    return mismatched[:10]


class SpanCollector:
    """A minimal OTLP/HTTP trace receiver on 127.0.0.1: keeps (trace, span, parent, name, start, end) of each span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str, int, int]] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                found = [(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name, s.start_time_unix_nano,
                          s.end_time_unix_nano)
                         for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
                with lock:
                    spans.extend(found)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="otlp", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()

    def own_times_ms(self) -> list[float]:
        """Per ``iteration`` span: its duration minus its ``chat`` and ``execute_tool`` children, in ms."""
        children: dict[str, int] = {}
        for _, _, parent, name, start, end in self.spans:
            if name.startswith(("chat", "execute_tool")):
                children[parent] = children.get(parent, 0) + (end - start)
        return sorted((end - start - children.get(span, 0)) / 1e6
                      for _, span, _, name, start, end in self.spans if name == "iteration")


def serve(folder: Path, secret: str, name: str, **env: str) -> Child:
    script = folder / "script.json"
    script.write_text(json.dumps(SCRIPT))
    data = data_folder(folder, name)
    environment = service_environment(data, secret, ALEX_MOCK_SCRIPT=str(script), ALEX_MOCK_DELAY_MS="0",
                                      **LIMITS, **env)
    return Child(module("service"), log=folder / f"{name}-server.log", env=environment, cpu=SERVER_CPU,
                 reads_input=False)


def listening_url(server: Child, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log.read_text(errors="replace").splitlines():
            if '"server_listening"' in line:
                return str(json.loads(line)["url"])
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited: {server.tail()}")
        time.sleep(0.05)
    raise TimeoutError(f"the server did not start: {server.tail()}")


def run_phase(folder: Path, plan: ClientPlan, name: str, profile: Path | None = None, **env: str
              ) -> tuple[dict[str, Any], float]:
    """One server and one client run; the client's figures and the server's CPU seconds during the run (and, with
    ``profile``, a py-spy profile of the server meanwhile)."""
    with serve(folder, plan.secret, name, **env) as server:
        plan.url = listening_url(server)
        cpu_before = server.cpu_seconds()
        profiler = Profiler(server.process.pid, profile) if profile is not None else None
        with Child([*module("loadtests.engine"), "client", json.dumps(asdict(plan))],
                   log=folder / f"{name}-client.log", cpu=CLIENT_CPU) as client:
            result = client.expect("done", plan.warmup + plan.seconds * plan.windows + 600)
        cpu = server.cpu_seconds() - cpu_before
        if profiler is not None:
            profiler.stop()
            print(summary(profile, top=40) if profile is not None else "", file=sys.stderr)
    return result, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32, help="tasks in flight (default 32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of each measured window (default 10)")
    parser.add_argument("--windows", type=int, default=3,
                        help="measured windows, one after the other; tasks/s is their median (default 3)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the measure (default 3)")
    parser.add_argument("--sequential", type=int, default=100, help="tasks run one by one for own time (default 100)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder with the servers' logs")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the throughput server with py-spy; the raw profile goes to this file")
    args = parser.parse_args(argv)
    with scratch(args.keep) as folder:
        plan = ClientPlan("", new_secret(), args.concurrency, args.seconds, args.warmup, windows=args.windows)
        throughput, cpu = run_phase(folder, plan, "throughput", args.profile)
        print(f"  throughput: {throughput['tasks_per_second']} tasks/s (median of the windows "
              f"{', '.join(str(rate) for rate in throughput['window_rates'])})", file=sys.stderr, flush=True)
        collector = SpanCollector()
        try:
            sequential = ClientPlan("", new_secret(), 1, 0.0, 0.0, tasks=args.sequential, verify=0)
            run_phase(folder, sequential, "own-time", OTEL_EXPORTER_OTLP_ENDPOINT=collector.url)
            own = collector.own_times_ms()
        finally:
            collector.close()
        if args.keep:
            print(f"  logs kept in {folder}", file=sys.stderr)
    # The server's CPU covers the whole run (warm-up and the verifying reads too), so per task of the whole run.
    cpu_per_task_ms = cpu / throughput["tasks_run"] * 1000 if throughput["tasks_run"] else float("nan")
    print(f"zero-delay scripted model, 4 iterations (3 with 2 tool calls each), {EVENTS_PER_TASK} events a task; "
          f"{machine()}")
    print()
    print(table(["figure", "value"], [
        (f"tasks/s ({args.concurrency} in flight), median of {args.windows} windows of {args.seconds:g} s",
         f"{throughput['tasks_per_second']:.1f} ({' / '.join(f'{rate:.1f}' for rate in throughput['window_rates'])})"),
        ("events/s stored and streamed", f"{throughput['events_per_second']:,.0f}"),
        ("task duration p50 / p99 (submit to task_complete)", f"{throughput['task_p50_ms']} / "
                                                                f"{throughput['task_p99_ms']} ms"),
        ("server CPU per task", f"{cpu_per_task_ms:.2f} ms"),
        ("tasks not completed, errors", f"{throughput['not_completed']}, {throughput['error_count']}"),
        ("tasks streamed whole (30 events, ids increasing)",
         f"{throughput['tasks_run'] - throughput['not_whole_count']} of {throughput['tasks_run']}"),
        ("sessions verified (streamed == stored)", f"{throughput['verified'] - len(throughput['mismatched'])} of "
                                                  f"{throughput['verified']}"),
        ("iterations measured (tasks run one by one)", str(len(own))),
        ("own time per iteration p50 / p90 / p99", f"{percentile(own, 0.5):.3f} / {percentile(own, 0.9):.3f} / "
                                                   f"{percentile(own, 0.99):.3f} ms"),
        ("own time per iteration mean", f"{statistics.fmean(own) if own else float('nan'):.3f} ms"),
    ]))
    checks = [
        Check(f"at least {MIN_TASKS_PER_SECOND:g} tasks/s", f"{throughput['tasks_per_second']:.1f}",
              throughput["tasks_per_second"] >= MIN_TASKS_PER_SECOND),
        Check("every event stored and streamed", f"{len(throughput['mismatched'])} sessions differ, "
              f"{throughput['not_whole_count']} streams not whole, "
              f"{throughput['not_completed']} tasks unfinished, {throughput['error_count']} errors "
              f"{throughput['mismatched'][:2] or ''}{throughput['not_whole'][:2] or ''}"
              f"{throughput['errors'][:2] or ''}",
              not throughput["mismatched"] and not throughput["not_whole_count"] and not throughput["not_completed"]
              and not throughput["error_count"]),
        Check(f"own time per iteration p50 < {MAX_OWN_MS_P50:g} ms",
              f"{percentile(own, 0.5):.3f} ms over {len(own)} iterations",
              bool(own) and percentile(own, 0.5) < MAX_OWN_MS_P50),
    ]
    return report(checks)


def client_main(config: str) -> None:
    plan = ClientPlan(**json.loads(config))
    result = uvloop.run(run_client(plan))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "client":
        client_main(sys.argv[2])
    else:
        sys.exit(main())
