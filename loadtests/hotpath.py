"""The service's own work per event and per delivery, in one process, without sockets: for comparing two versions
of the delivery path on a machine too noisy for the fan-out benchmark to tell a few per cent apart.

    .venv/bin/python -m loadtests.hotpath                  # CPU time (median of rounds)
    .venv/bin/python -m loadtests.hotpath --instructions   # instructions, under valgrind: the same on every run

It drives the real path the fan-out benchmark's service does (the engine's ``LogSink``, ``SqliteEventLog.append``
with its flusher and SQLite, the broker, ``SessionFeed``'s write-through, the stream's socket writer and
``SentTally``) with the benchmark's producer: one task per session, 100 sessions, ``tool_call_stream`` events
with 100-byte payloads. Three runs tell the pieces apart:

- ``producer``: making the events alone (what the benchmark's own producer costs, in every server);
- ``append``: the events appended to the log with no stream: the log's work per event, over ``producer``;
- ``deliver``: each session followed by ``--streams`` streams waiting for events, whose frames go to a transport
  that takes any bytes at once: the work per delivery, over ``append``, divided by the streams.

The streams are real ``SessionFeed`` objects whose socket writer writes to uvicorn's own request cycle class, so
everything up to the system call is the service's. What is left out is the kernel's share of a send, which the
bare reference pays just the same, and the client.

With ``--instructions`` each run goes under valgrind's cachegrind (``apt-get install valgrind``) twice, with two
numbers of events, and the difference is divided by the difference in events: the instructions of one event,
start-up excluded, the same to within a fraction of a per cent from run to run. Instructions are not time (a
cache miss or a system call weighs more than its count), but on the delivery path, which is Python all the way to
the socket, they follow it closely.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from loadtests.servers.control import TASK_ID, TRACE_ID, produce
from loadtests.workload import Workload
from service.adapters.broker.memory import MemoryBroker
from service.adapters.store.sqlite import SqliteDatabase
from service.adapters.store.sqlite_events import SqliteEventLog
from service.api.routes.stream import SentTally
from service.api.stream_host import socket_writer
from service.app.stream import LogSink, SessionFeed
from service.domain.events import ToolCallStream
from service.observability.metrics import Metrics

WORKLOAD = Workload()
SESSIONS = WORKLOAD.sessions
SESSION_IDS = WORKLOAD.session_ids
PAYLOAD_BYTES = WORKLOAD.payload_bytes
MODES = ("producer", "append", "deliver")
CPU_EVENTS = 20_000
INSTRUCTION_EVENTS = (2_000, 6_000)
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


class _Flow:
    write_paused = False


class _Transport:
    """Takes every write at once."""

    write = staticmethod(len)

    def is_closing(self) -> bool:
        return False


def _cycle() -> Any:
    """uvicorn's request cycle (the class ``socket_writer`` knows) as it stands once a chunked head went out."""
    cycle = RequestResponseCycle.__new__(RequestResponseCycle)
    cycle.__dict__.update(transport=_Transport(), flow=_Flow(), disconnected=False, response_complete=False,
                          chunked_encoding=True)
    return cycle


async def _follow(log: SqliteEventLog, tally: SentTally, streams: int) -> list[tuple[SessionFeed, asyncio.Task[Any]]]:
    """``streams`` feeds per session, each replayed (nothing stored yet) and waiting for live events with
    write-through on, as a stream is."""
    followed = []
    for session_id in SESSION_IDS:
        for _ in range(streams):
            feed = SessionFeed(log, session_id, 0, 1_000)
            writer = socket_writer(_cycle().send)
            assert writer is not None
            feed.write_through(writer.write, tally.account)
            followed.append((feed, asyncio.create_task(feed.next())))
    # The replays' reads go through the database thread, a few turns each; nothing to wait on but the feeds.
    while not all(feed.live for feed, _ in followed):  # noqa: ASYNC110
        await asyncio.sleep(0.001)
    await asyncio.sleep(0)
    return followed


async def _produce(sink: LogSink | None, events_per_session: int) -> None:
    """The benchmark's producer (a task per session, an event per turn of the loop), into ``sink`` (None: the
    events are made, not appended)."""

    async def emit(session_id: str, seq: int, chunk: str) -> None:
        event = ToolCallStream(session_id=session_id, task_id=TASK_ID, trace_id=TRACE_ID, iteration=1,
                               tool_name="bash", call_id="call_1_0", chunk=chunk)
        if sink is None:
            await asyncio.sleep(0)  # the turn LogSink takes
        else:
            await sink.emit(event)

    await produce(emit, SESSION_IDS, events_per_session, PAYLOAD_BYTES)


async def _round(folder: Path, mode: str, events: int, streams: int) -> float:
    """CPU seconds per event of one round, on a new database."""
    db = await SqliteDatabase.open(folder / "events.db")
    log = await SqliteEventLog.open(db, MemoryBroker(), retention=10_000)
    try:
        followed = await _follow(log, SentTally(Metrics(process=False)), streams) if mode == "deliver" else []
        sink = None if mode == "producer" else LogSink(log)
        per_session = events // SESSIONS
        await _produce(sink, 5)  # warm-up: first rows, first statements
        await log.flush()
        started = time.process_time()
        await _produce(sink, per_session)
        await log.flush()
        seconds = (time.process_time() - started) / (per_session * SESSIONS)
        delivered = sum(feed.delivered for feed, _ in followed)
        if delivered != len(followed) * (per_session + 5):
            raise SystemExit(f"{delivered} deliveries to {len(followed)} streams: some were not written through")
        for _, reader in followed:
            reader.cancel()
        return seconds
    finally:
        await log.close()
        await db.close()
        (folder / "events.db").unlink()


async def _rounds(mode: str, events: int, streams: int, rounds: int) -> list[float]:
    folder = Path(tempfile.mkdtemp(prefix="hotpath-"))
    try:
        return [await _round(folder, mode, events, streams) for _ in range(rounds)]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _child(mode: str, events: int, streams: int, rounds: int) -> None:
    per_event = uvloop.run(_rounds(mode, events, streams, rounds))
    print(" ".join(f"{seconds * 1e6:.3f}" for seconds in per_event))


def _child_command(mode: str, events: int, streams: int, rounds: int) -> list[str]:
    """This module run as the child that measures one mode."""
    return [sys.executable, "-m", "loadtests.hotpath", "--child", mode, "--events", str(events),
            "--streams", str(streams), "--rounds", str(rounds)]


def _instructions(mode: str, events: int, streams: int) -> int:
    """Instructions of a whole child run under cachegrind."""
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
               *_child_command(mode, events, streams, 1)]
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"valgrind failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def _cpu(mode: str, events: int, streams: int, rounds: int) -> float:
    """Median CPU microseconds per event of ``rounds`` rounds, in a child pinned to one core when it can be."""
    command = _child_command(mode, events, streams, rounds)
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        command = ["taskset", "-c", "0", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-2000:]}")
    return statistics.median(float(value) for value in done.stdout.split())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.hotpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", action="store_true", help="count instructions under valgrind")
    parser.add_argument("--streams", type=int, default=10, help="streams per session in the deliver run")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per run for CPU time (median)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--events", type=int, default=CPU_EVENTS, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        _child(options.child, options.events, options.streams, options.rounds)
        return
    cost: dict[str, float] = {}
    if options.instructions:
        if shutil.which("valgrind") is None:
            print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
            raise SystemExit(2)
        low, high = INSTRUCTION_EVENTS
        unit = "instructions"
        for mode in MODES:
            cost[mode] = ((_instructions(mode, high, options.streams) - _instructions(mode, low, options.streams))
                          / (high - low))
    else:
        unit = "us of CPU"
        for mode in MODES:
            cost[mode] = _cpu(mode, options.events, options.streams, options.rounds)
    streams = options.streams
    rows = [
        ("making an event (the benchmark's producer)", cost["producer"]),
        ("the log's work per event (append, no stream)", cost["append"] - cost["producer"]),
        (f"per delivery ({streams} streams a session)", (cost["deliver"] - cost["append"]) / streams),
        (f"an event with its {streams} deliveries, producer excluded", cost["deliver"] - cost["producer"]),
    ]
    precision = 0 if options.instructions else 2
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  {unit}")
    for label, value in rows:
        print(f"{label:{width}}  {value:,.{precision}f}")


if __name__ == "__main__":
    main()
