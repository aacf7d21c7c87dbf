"""The load client's reading of a stream: every event counted once, in order, however the bytes arrive.

Its figures (gaps, events received, latencies) judge every server, so its parser is held to the framings the
servers use: chunked bodies (the service and the hub), close-delimited ones (bare), and reads that cut a chunk or a
frame anywhere.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from loadtests.client import SseStream, Totals
from loadtests.workload import payload

EVENTS = 12
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
PLAIN_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"


def frames(seqs: list[int]) -> list[bytes]:
    """The ``connected`` frame, then one ``tool_call_stream`` frame per sequence number."""
    out = [b'event: connected\ndata: {"session_id": "s"}\n\n']
    for seq in seqs:
        data = json.dumps({"event_type": "tool_call_stream", "chunk": payload(seq, 100)})
        out.append(f"event: tool_call_stream\ndata: {data}\nid: {seq + 1}\n\n".encode())
    return out


def chunk(frame: bytes, extension: bytes = b"") -> bytes:
    return b"%x%b\r\n%b\r\n" % (len(frame), extension, frame)


async def read(reads: list[bytes]) -> tuple[SseStream, Totals]:
    """A stream that expects :data:`EVENTS` events, given ``reads`` one ``data_received`` each."""
    loop = asyncio.get_running_loop()
    totals = Totals()
    stream = SseStream(totals, b"", expected=EVENTS, done=asyncio.Event(), all_streams=1,
                       on_connected=loop.create_future())
    for data in reads:
        stream.data_received(data)
    return stream, totals


def pieces(data: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    """``data`` cut into reads of the given sizes, in turn."""
    out, position, turn = [], 0, 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        out.append(data[position:position + size])
        position += size
        turn += 1
    return out


def assert_all_in_order(stream: SseStream, totals: Totals) -> None:
    assert stream.on_connected.done()
    assert stream.received == EVENTS
    assert stream.gaps == 0
    assert stream.finished
    assert len(totals.latencies) == EVENTS
    assert all(0 <= latency < 60 for latency in totals.latencies)
    assert totals.errors == []


async def test_one_whole_chunk_per_read_as_the_service_writes_it() -> None:
    stream, totals = await read([CHUNKED_HEAD, *(chunk(f) for f in frames(list(range(EVENTS))))])
    assert stream.chunked
    assert_all_in_order(stream, totals)
    assert stream.raw == b""


@pytest.mark.parametrize("sizes", [(1,), (7,), (13, 2, 50), (64,), (300, 5)])
async def test_chunks_cut_anywhere_across_reads(sizes: tuple[int, ...]) -> None:
    body = b"".join(chunk(f) for f in frames(list(range(EVENTS))))
    stream, totals = await read([CHUNKED_HEAD, *pieces(body, sizes)])
    assert_all_in_order(stream, totals)


async def test_several_chunks_in_one_read_with_an_extension_and_the_last_chunk() -> None:
    parts = [chunk(f) for f in frames(list(range(EVENTS)))]
    parts[3] = chunk(frames([2])[1], b";note=1")  # the event of seq 2, with a chunk extension
    body = b"".join(parts) + b"0\r\n\r\n"
    stream, totals = await read([CHUNKED_HEAD, body[:500], body[500:]])
    assert_all_in_order(stream, totals)


async def test_a_frame_split_over_two_chunks() -> None:
    connected, *events = frames(list(range(EVENTS)))
    halves = [part for frame in events for part in (frame[:40], frame[40:])]
    stream, totals = await read([CHUNKED_HEAD, chunk(connected), *(chunk(half) for half in halves)])
    assert_all_in_order(stream, totals)


@pytest.mark.parametrize("sizes", [(100_000,), (9,), (31, 3)])
async def test_close_delimited_body(sizes: tuple[int, ...]) -> None:
    body = b"".join(frames(list(range(EVENTS))))
    stream, totals = await read([PLAIN_HEAD, *pieces(body, sizes)])
    assert not stream.chunked
    assert_all_in_order(stream, totals)


async def test_a_missing_event_is_a_gap() -> None:
    seqs = [seq for seq in range(EVENTS + 1) if seq != 5]
    stream, _ = await read([CHUNKED_HEAD, *(chunk(f) for f in frames(seqs))])
    assert stream.received == EVENTS
    assert stream.gaps == 1


async def test_latency_is_arrival_minus_the_time_the_payload_was_made() -> None:
    made = time.monotonic()
    _, totals = await read([CHUNKED_HEAD, *(chunk(f) for f in frames(list(range(EVENTS))))])
    assert totals.first_sent >= made
    assert max(totals.latencies) <= time.monotonic() - made
