"""The native load client (``loadtests/native/sseclient.c``) against a real local server: it must count what the
Python client counts, whatever the framing and however the bytes are cut, since the fan-out's figures are its.

Each test starts an asyncio server on 127.0.0.1 that serves event streams as the benchmark servers do (chunked
with LF line endings as the service, chunked with CRLF and several frames to a chunk as sse-starlette,
close-delimited as bare), writing every frame in pieces, and runs ``python -m loadtests.client`` against it as the
benchmarks do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from loadtests import native
from loadtests.client import ClientConfig
from loadtests.workload import payload

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 12
EVENTS = 30


class FramingServer:
    """Event streams in one ``framing`` (``service``, ``starlette`` or ``bare``); every write cut into pieces of
    ``cut`` bytes. Events start once ``streams`` streams are open; ``skip`` leaves one sequence number out;
    ``status`` other than 200 refuses every stream."""

    def __init__(self, framing: str, *, streams: int = STREAMS, events: int = EVENTS, cut: int = 7,
                 skip: int | None = None, status: int = 200) -> None:
        self.framing = framing
        self.streams = streams
        self.events = events
        self.cut = cut
        self.skip = skip
        self.status = status
        self.writers: list[tuple[str, asyncio.StreamWriter]] = []
        self.all_open = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def chunked(self) -> bool:
        return self.framing != "bare"

    def head(self) -> bytes:
        if self.status != 200:
            return b"HTTP/1.1 %d Forbidden\r\ncontent-length: 0\r\n\r\n" % self.status
        framing = b"transfer-encoding: chunked" if self.chunked else b"connection: close"
        return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n%b\r\n\r\n" % framing

    def frame(self, name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
        lines = ([f"id: {event_id}"] if event_id is not None else []) + [f"event: {name}", f"data: {json.dumps(data)}"]
        end = "\r\n" if self.framing == "starlette" else "\n"
        return (end.join(lines) + end + end).encode()

    def body(self, frames: list[bytes], *, extension: bool = False) -> bytes:
        if not self.chunked:
            return b"".join(frames)
        if self.framing == "starlette":  # two frames to a chunk
            frames = [b"".join(frames[i:i + 2]) for i in range(0, len(frames), 2)]
        note = b";n=1" if extension else b""
        return b"".join(b"%x%b\r\n%b\r\n" % (len(frame), note, frame) for frame in frames)

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        for start in range(0, len(data), self.cut):
            writer.write(data[start:start + self.cut])
            await writer.drain()
            await asyncio.sleep(0)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        target = request.split(b" ", 2)[1].decode()
        session_id = parse_qs(urlsplit(target).query)["session_id"][0]
        writer.write(self.head())
        if self.status != 200:
            writer.close()
            return
        await self.write(writer, self.body([self.frame("connected", {"session_id": session_id})]))
        self.writers.append((session_id, writer))
        if len(self.writers) == self.streams:
            self.all_open.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client leaves

    async def produce(self) -> None:
        await self.all_open.wait()
        seqs = [seq for seq in range(self.events + (self.skip is not None)) if seq != self.skip]
        for seq in seqs:
            for session_id, writer in self.writers:
                frames = [self.frame("tool_call_stream", {"session_id": session_id, "chunk": payload(seq, 100)},
                                     seq + 1)]
                if seq % 10 == 3:
                    frames.append(b": ping\n\n")
                await self.write(writer, self.body(frames, extension=seq % 7 == 5))
        for _, writer in self.writers:
            if self.chunked:
                await self.write(writer, b"0\r\n\r\n")
            else:
                writer.close()

    def start(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self.serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@contextlib.asynccontextmanager
async def running(server: FramingServer) -> AsyncIterator[str]:
    listener = await asyncio.start_server(server.start, "127.0.0.1", 0)
    producer = asyncio.create_task(server.produce())
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        producer.cancel()
        listener.close()
        for _, writer in server.writers:
            writer.close()
        for task in list(server.tasks):
            task.cancel()
        await asyncio.gather(producer, *server.tasks, return_exceptions=True)


async def run_client(url: str, *, use_native: bool, streams: int = STREAMS, events: int = EVENTS,
                     run_timeout: float = 30) -> list[dict[str, Any]]:
    """``python -m loadtests.client`` against ``url``, as the benchmarks run it; every JSON line it printed."""
    sessions = [f"s{n}" for n in range(4)]
    config = ClientConfig(urls=[url], session_ids=sessions, subjects=[f"u{n}" for n in range(4)], streams=streams,
                          expected=events, run_timeout=run_timeout, connect_timeout=30, keep_latencies=True,
                          native=str(native.build()) if use_native else None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtests.client", json.dumps(asdict(config)), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines, err.decode()
    return lines


def assert_every_event_counted(done: dict[str, Any], *, gaps: int = 0) -> None:
    assert done["state"] == "done"
    assert done["deliveries"] == done["expected"] == STREAMS * EVENTS
    assert done["gaps"] == gaps
    assert done["short_streams"] == 0
    assert not done["timed_out"]
    assert done["errors"] == []
    latencies = done["latencies"]
    assert len(latencies) == STREAMS * EVENTS
    assert latencies == sorted(latencies)
    assert latencies[0] >= 0
    assert latencies[-1] < 60
    assert done["p50_ms"] <= done["p99_ms"] <= done["max_ms"] == pytest.approx(latencies[-1] * 1000, abs=0.001)
    assert done["deliveries_per_second"] > 0
    assert 0 <= done["client_cpu_share"] <= 1.5


@pytest.mark.parametrize("framing", ["service", "starlette", "bare"])
@pytest.mark.parametrize("cut", [1, 7, 4096])
async def test_every_event_is_counted_once_in_order_whatever_the_framing_and_the_cuts(framing: str, cut: int) -> None:
    async with running(FramingServer(framing, cut=cut)) as url:
        connected, done = await run_client(url, use_native=True)
    assert connected == {"state": "connected", "streams": STREAMS, "seconds": connected["seconds"]}
    assert done["client"] == "native"
    assert_every_event_counted(done)


async def test_it_counts_what_the_python_client_counts() -> None:
    results = []
    for use_native in (True, False):
        async with running(FramingServer("starlette", skip=4)) as url:
            results.append((await run_client(url, use_native=use_native))[-1])
    ours, python = results
    assert (ours["client"], python["client"]) == ("native", "python")
    for done in results:
        assert_every_event_counted(done, gaps=STREAMS)
    for figure in ("deliveries", "expected", "gaps", "short_streams", "closed_streams", "streams"):
        assert ours[figure] == python[figure], figure


async def test_a_missing_event_is_a_gap_on_every_stream() -> None:
    async with running(FramingServer("service", skip=11)) as url:
        done = (await run_client(url, use_native=True))[-1]
    assert_every_event_counted(done, gaps=STREAMS)


async def test_streams_that_end_early_are_short_and_the_run_ends_at_its_time_limit() -> None:
    async with running(FramingServer("bare", events=EVENTS // 2)) as url:
        done = (await run_client(url, use_native=True, run_timeout=1))[-1]
    assert done["timed_out"]
    assert done["deliveries"] == STREAMS * (EVENTS // 2)
    assert done["short_streams"] == STREAMS
    assert done["closed_streams"] == STREAMS, "bare closes its streams once it has sent everything"


async def test_a_refused_stream_is_retried_then_the_run_fails_with_the_servers_answer() -> None:
    async with running(FramingServer("service", status=403)) as url:
        lines = await run_client(url, use_native=True, streams=1)
    assert lines == [{"state": "failed", "error": lines[0]["error"]}]
    assert "refused: HTTP/1.1 403 Forbidden" in lines[0]["error"]


def test_the_build_is_kept_for_the_same_source(tmp_path: Path) -> None:
    first = native.build(tmp_path)
    assert first.parent == tmp_path
    assert first.stat().st_mode & 0o111, "executable"
    assert native.build(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name], "no partial build is left behind"
