"""The one load client of the stream benchmarks: many SSE streams on raw asyncio sockets (uvloop), in one process.

Every server is measured with this client, so their figures differ only by the server. It speaks just enough
HTTP/1.1 (a GET, the response head, chunked or close-delimited bodies) and SSE (frames split on the blank line,
comments, the ``connected`` frame) to stay far cheaper than any server it measures: a stream costs one protocol
object, and a read costs one split and, per event, three ``find`` calls on its payload (:mod:`loadtests.workload`).

Run by the benchmarks as ``python -m loadtests.client CONFIG_JSON``; it prints JSON lines on stdout:
``{"state": "connected", ...}`` once every stream has its ``connected`` frame, then ``{"state": "done", ...}`` with
the figures once every stream has every event (or the time ran out). Streams are dealt over ``urls`` in turn, so
one client can follow several replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast
from urllib.parse import urlsplit

import uvloop

from loadtests.workload import MARK
from service.tokens import mint_token

_MARK = MARK.encode()
_CONNECTED = b"event: connected"
_HEAD_END = b"\r\n\r\n"


@dataclass
class ClientConfig:
    urls: list[str]
    session_ids: list[str]
    subjects: list[str]
    """The token subject of each session."""
    streams: int
    expected: int
    """Events each stream must receive; 0 for idle streams."""
    secret: str | None = None
    """Mints a token per subject when given; the baselines ignore it."""
    path: str = "/api/sse"
    connect_concurrency: int = 200
    connect_timeout: float = 120.0
    run_timeout: float = 120.0
    hold_seconds: float = 0.0
    """Idle streams: how long to hold them open, counting heartbeats, after all are connected."""
    keep_latencies: bool = False
    """Put every latency sample in the result (for plots); otherwise only the percentiles."""
    native: str | None = None
    """The native client's binary (:mod:`loadtests.native`), to run in this one's place: the same streams and
    figures at a fraction of the CPU. One URL, and streams that expect events (no idle hold)."""

    @classmethod
    def from_json(cls, text: str) -> ClientConfig:
        return cls(**json.loads(text))


@dataclass
class Totals:
    """What all the streams of one run received, kept in one place so a read touches few objects."""

    latencies: list[float] = field(default_factory=list)
    received: int = 0
    first_sent: float = float("inf")
    last_received: float = 0.0
    done_streams: int = 0
    held_from: float = 0.0
    """When every stream was open (idle runs count heartbeats from there)."""
    errors: list[str] = field(default_factory=list)


class SseStream(asyncio.Protocol):
    """One SSE stream; parses what arrives and records each event's latency and sequence."""

    def __init__(self, totals: Totals, request: bytes, *, expected: int, done: asyncio.Event, all_streams: int,
                 on_connected: asyncio.Future[None]) -> None:
        self.totals = totals
        self.request = request
        self.expected = expected
        self.done = done
        self.all_streams = all_streams
        self.on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.raw = b""
        self.buffer = b""
        self.separator = b"\n\n"
        self.next_seq = 0
        self.received = 0
        self.gaps = 0
        self.pings: list[float] = []
        self.connected_at = 0.0
        self.finished = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.in_body:
            head = self.head + data
            end = head.find(_HEAD_END)
            if end < 0:
                self.head = head
                return
            self.in_body = True
            status = head[:head.find(b"\r\n")]
            if b" 200 " not in status + b" ":
                self._fail(f"refused: {status.decode(errors='replace')}")
                return
            self.chunked = b"transfer-encoding: chunked" in head[:end].lower()
            data = head[end + 4:]
            self.head = b""
            if not data:
                return
        if self.chunked:
            data = self._dechunk(data)
        buffer = self.buffer + data if self.buffer else data
        if not self.received and self.separator == b"\n\n" and b"\r\n" in buffer[:200]:
            self.separator = b"\r\n\r\n"
        frames = buffer.split(self.separator)
        self.buffer = frames.pop()
        totals = self.totals
        latencies = totals.latencies
        for frame in frames:
            i = frame.find(_MARK)
            if i < 0:
                if frame.startswith(b":"):
                    self.pings.append(now)
                elif _CONNECTED in frame and not self.connected_at:
                    self.connected_at = now
                    if not self.on_connected.done():
                        self.on_connected.set_result(None)
                continue
            j = frame.find(_MARK, i + 1)
            k = frame.find(_MARK, j + 1)
            seq = int(frame[i + 1:j])
            sent = float(frame[j + 1:k])
            latencies.append(now - sent)
            totals.first_sent = min(totals.first_sent, sent)
            if seq != self.next_seq:
                self.gaps += 1
            self.next_seq = seq + 1
            self.received += 1
        if frames:
            totals.last_received = now
            totals.received += len(frames)
            if self.expected and not self.finished and self.received >= self.expected:
                self.finished = True
                totals.done_streams += 1
                if totals.done_streams == self.all_streams:
                    self.done.set()

    def _dechunk(self, data: bytes) -> bytes:
        if not self.raw:
            # What a server writing one event at a time sends: one whole chunk, alone. Taken apart here without
            # the general loop below, whose list and join added half again to the cost of parsing an event.
            line_end = data.find(b"\r\n", 0, 10)
            if line_end > 0:
                try:
                    size = int(data[:line_end], 16)
                except ValueError:  # a chunk extension: the general way
                    size = 0
                if size and len(data) == line_end + size + 4 and data.endswith(b"\r\n"):
                    return data[line_end + 2:-2]
        raw = self.raw + data if self.raw else data
        out: list[bytes] = []
        position, size_of_raw = 0, len(raw)
        while True:
            line_end = raw.find(b"\r\n", position)
            if line_end < 0:
                break
            size_line = raw[position:line_end]
            size = int(size_line if b";" not in size_line else size_line.split(b";")[0], 16)
            if size == 0:
                position = size_of_raw
                break
            start = line_end + 2
            if start + size + 2 > size_of_raw:
                break
            out.append(raw[start:start + size])
            position = start + size + 2
        self.raw = raw[position:]
        return out[0] if len(out) == 1 else b"".join(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.on_connected.done():
            self.on_connected.set_exception(ConnectionError("closed before the connected frame"))

    def _fail(self, reason: str) -> None:
        self.totals.errors.append(reason)
        if not self.on_connected.done():
            self.on_connected.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()


def _factory(stream: SseStream) -> Callable[[], SseStream]:
    return lambda: stream


def stream_requests(config: ClientConfig) -> list[bytes]:
    """The request of each stream: stream ``n`` follows session ``n % sessions`` on URL ``n % urls``, with a token
    of that session's subject when the config has a secret."""
    tokens = {subject: mint_token(config.secret, subject, ["sessions:read", "tasks:write", "sessions:write"], 86400)
              for subject in set(config.subjects)} if config.secret else {}
    requests = []
    for index in range(config.streams):
        session = index % len(config.session_ids)
        requests.append(request_bytes(config.urls[index % len(config.urls)], config.path,
                                      config.session_ids[session], tokens.get(config.subjects[session])))
    return requests


def request_bytes(url: str, path: str, session_id: str, token: str | None) -> bytes:
    parts = urlsplit(url)
    lines = [f"GET {path}?session_id={session_id} HTTP/1.1", f"Host: {parts.netloc}", "Accept: text/event-stream",
             "Cache-Control: no-cache"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def run(config: ClientConfig) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    totals = Totals()
    done = asyncio.Event()
    requests = stream_requests(config)
    streams: list[SseStream] = []
    limit = asyncio.Semaphore(config.connect_concurrency)

    async def open_one(index: int) -> None:
        parts = urlsplit(config.urls[index % len(config.urls)])
        request = requests[index]
        async with limit:
            for attempt in range(5):
                connected: asyncio.Future[None] = loop.create_future()
                stream = SseStream(totals, request, expected=config.expected, done=done, all_streams=config.streams,
                                   on_connected=connected)
                try:
                    await loop.create_connection(_factory(stream), parts.hostname or "127.0.0.1", parts.port or 80)
                    await connected
                except (ConnectionError, OSError) as exc:
                    if attempt == 4:
                        totals.errors.append(f"stream {index}: {exc}")
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                streams.append(stream)
                return

    started = time.monotonic()
    async with asyncio.timeout(config.connect_timeout):
        await asyncio.gather(*(open_one(n) for n in range(config.streams)))
    connected_at = time.monotonic()
    emit({"state": "connected", "streams": len(streams), "seconds": round(connected_at - started, 3)})
    cpu_before = cpu_seconds()
    measured_from = totals.held_from = time.monotonic()
    timed_out = False
    if config.expected:
        try:
            async with asyncio.timeout(config.run_timeout):
                await done.wait()
        except TimeoutError:
            timed_out = True
    else:
        await asyncio.sleep(config.hold_seconds)
    measured_until = time.monotonic()
    cpu_used = cpu_seconds() - cpu_before
    result = summarize(config, totals, streams, timed_out)
    result["client_cpu_share"] = round(cpu_used / max(1e-9, measured_until - measured_from), 3)
    result["hold_seconds"] = round(measured_until - measured_from, 3)
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
    return result


def summarize(config: ClientConfig, totals: Totals, streams: list[SseStream], timed_out: bool) -> dict[str, Any]:
    latencies = sorted(totals.latencies)
    deliveries = len(latencies)
    span = totals.last_received - totals.first_sent if deliveries else 0.0
    short = [s for s in streams if s.received < config.expected]
    result: dict[str, Any] = {
        "state": "done",
        "client": "python",
        "streams": len(streams),
        "deliveries": deliveries,
        "expected": config.expected * config.streams,
        "seconds": round(span, 4),
        "deliveries_per_second": round(deliveries / span, 1) if span > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p90_ms": round(percentile(latencies, 0.90) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else float("nan"),
        "gaps": sum(s.gaps for s in streams),
        "short_streams": len(short),
        "closed_streams": sum(1 for s in streams if s.closed),
        "timed_out": timed_out,
        "errors": totals.errors[:10],
    }
    if config.hold_seconds:
        result["heartbeats"] = heartbeat_figures(streams, totals.held_from)
    if config.keep_latencies:
        result["latencies"] = latencies
    return result


def heartbeat_figures(streams: list[SseStream], since: float) -> dict[str, Any]:
    """Intervals between consecutive pings of each stream, counted from ``since`` (every stream open): opening
    thousands of streams keeps the server busy, and that is not what heartbeats are measured for."""
    intervals: list[float] = []
    counts: list[int] = []
    for stream in streams:
        marks = [t for t in stream.pings if t >= since]
        intervals.extend(b - a for a, b in itertools.pairwise(marks))
        counts.append(len(marks))
    intervals.sort()
    return {
        "pings": sum(counts),
        "streams_without_ping": sum(1 for c in counts if c == 0),
        "min_pings_per_stream": min(counts, default=0),
        "interval_p50_s": round(percentile(intervals, 0.5), 4),
        "interval_p99_s": round(percentile(intervals, 0.99), 4),
        "interval_max_s": round(intervals[-1], 4) if intervals else float("nan"),
    }


def run_native(config: ClientConfig) -> NoReturn:
    """Become the native client (``exec``: same process, same core, same stdout), given this client's requests."""
    assert config.native is not None
    if len(config.urls) != 1 or not config.expected or config.hold_seconds:
        raise ValueError("the native client follows one URL, with events expected")
    with tempfile.NamedTemporaryFile("wb", prefix="sseclient-", suffix=".requests", delete=False) as file:
        for request in stream_requests(config):
            file.write(b"%d\n%b" % (len(request), request))
    parts = urlsplit(config.urls[0])
    arguments = [parts.hostname or "127.0.0.1", str(parts.port or 80), str(config.streams), str(config.expected),
                 str(config.connect_timeout), str(config.run_timeout), str(config.connect_concurrency),
                 "1" if config.keep_latencies else "0", file.name]
    sys.stdout.flush()
    os.execv(config.native, [config.native, *arguments])  # noqa: S606 - our own binary, arguments as a list


def main() -> None:
    config = ClientConfig.from_json(sys.argv[1])
    try:
        if config.native is not None:
            run_native(config)
        result = uvloop.run(run(config))
    except Exception as exc:  # the parent reads one line either way
        emit({"state": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None
    emit(result)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
