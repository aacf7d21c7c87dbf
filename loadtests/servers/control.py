"""What every benchmark server shares: the control channel on stdin and the event producer.

A server prints ``{"state": "listening", "port": N}`` once it accepts streams, then obeys JSON lines on stdin:
``{"do": "produce", "sessions": [...], "events": K, "payload_bytes": B, "rate": R}`` (``rate`` optional: events
per second) runs the producer and answers
``{"state": "produced", ...}``; end of input or ``{"do": "quit"}`` stops the server.

The producer is the same for every server: one asyncio task per session (as one running agent task per session
would be), each emitting its session's ``K`` events, one per turn of the event loop. The server's ``emit``
publishes one event and hands the loop back once, as the service's engine sink does after every event.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from loadtests.workload import payload

Emit = Callable[[str, int, str], Awaitable[None]]
"""``emit(session_id, seq, payload)``: publish one event to the session's streams, then yield to the loop once."""


def announce(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def produce(emit: Emit, sessions: list[str], events: int, payload_bytes: int, rate: float | None = None
                  ) -> float:
    """Run one producer task per session; returns the seconds it took.

    Without ``rate`` each producer emits as fast as the loop lets it (the server's capacity is the limit); with
    ``rate`` (events per second, all sessions together) each keeps to a schedule, the sessions spread evenly over
    each period, so that the load offered does not depend on how fast the server is.
    """
    started = time.monotonic()

    async def one(index: int, session_id: str) -> None:
        period = len(sessions) / rate if rate else 0.0
        for seq in range(events):
            if period:
                await asyncio.sleep(max(0.0, started + (seq + index / len(sessions)) * period - time.monotonic()))
            await emit(session_id, seq, payload(seq, payload_bytes))

    await asyncio.gather(*(one(index, session_id) for index, session_id in enumerate(sessions)))
    return time.monotonic() - started


async def obey(emit: Emit, stop: Callable[[], None]) -> None:
    """Read commands from stdin until it ends or says quit, then call ``stop``."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command.get("do") == "produce":
                seconds = await produce(emit, command["sessions"], command["events"], command["payload_bytes"],
                                        command.get("rate"))
                announce({"state": "produced", "seconds": round(seconds, 4)})
            elif command.get("do") == "quit":
                break
    finally:
        stop()


async def serve(server: uvicorn.Server, emit: Emit) -> None:
    """Run ``server``; once it listens, announce its port and obey the commands on stdin until told to quit."""

    def stop() -> None:
        server.should_exit = True

    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            return
        await asyncio.sleep(0.01)
    control = asyncio.create_task(obey(emit, stop))
    announce({"state": "listening", "port": server.servers[0].sockets[0].getsockname()[1]})
    await serving
    control.cancel()


TASK_ID = "t_benchmark000000"
TRACE_ID = "0" * 32


def envelope(event_id: int, session_id: str, chunk: str) -> dict[str, Any]:
    """The baselines' event: the fields (and so the size) of the service's ``tool_call_stream`` event."""
    now = time.time()
    return {
        "event_type": "tool_call_stream",
        "id": str(event_id),
        "session_id": session_id,
        "task_id": TASK_ID,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
        "trace_id": TRACE_ID,
        "iteration": 1,
        "tool_name": "bash",
        "call_id": "call_1_0",
        "chunk": chunk,
    }
