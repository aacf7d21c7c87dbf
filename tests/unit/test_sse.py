"""The event-stream response at the ASGI level: writes, heartbeats, leaving clients, stalls, paced writes, the host."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from starlette.types import Message, Receive, Scope, Send
from uvicorn._types import HTTPScope
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from service.adapters.broker.memory import MemoryBroker
from service.api.sse import PING, EventStreamResponse, WritePacer
from service.api.stream_host import HANDOFF, Handoff, StreamHost, socket_writer
from service.domain.events import StoredEvent, Thinking, connected_frame

GUARD = 5.0
REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="")


class Source:
    """A FrameSource over a real broker subscription, recording what the response asked of it."""

    def __init__(self, buffer: int = 100) -> None:
        self.broker = MemoryBroker()
        self.subscription = self.broker.subscribe("s1", buffer)
        self.next_id = 1
        self.writes: list[list[int]] = []
        self.finished: list[str | None] = []
        self.went = False
        self._batch: list[StoredEvent] = []

    def publish(self, count: int = 1) -> None:
        for _ in range(count):
            self.broker.publish(StoredEvent.encode(self.next_id, Thinking(session_id="s1", task_id="t1",
                                                                          delta=f"d{self.next_id}")))
            self.next_id += 1

    def opening(self) -> bytes:
        return connected_frame("s1")

    def opened(self) -> None:
        """Nothing to count."""

    @property
    def interruptible(self) -> bool:
        return True

    async def next_write(self) -> bytes | None:
        batch = await self.subscription.next_batch()
        if not batch:
            return None
        self._batch = batch
        return b"".join(event.frame for event in batch)

    @property
    def events(self) -> int:
        return len(self._batch)

    @property
    def waited(self) -> float:
        return time.time() - self._batch[0].appended_at if self._batch else 0.0

    def written(self) -> None:
        self.writes.append([event.id for event in self._batch])

    def closing(self) -> bytes | None:
        return None

    def notify_when_filling(self, callback: Callable[[], None]) -> None:
        self.subscription.notify_when_filling(callback)

    def write_through(self, write: Callable[[bytes], bool]) -> None:
        def offer(frame: bytes) -> bool:
            if not write(frame):
                return False
            self.writes.append([int(frame.split(b"\n", 1)[0].removeprefix(b"id: "))])
            return True

        self.subscription.write_through(offer)

    def gone(self) -> None:
        self.went = True
        self.subscription.close("client_gone")

    def finish(self, reason: str | None) -> None:
        self.finished.append(reason)


class Client:
    """The server side of one connection, as uvicorn behaves: ``receive`` says ``http.disconnect`` once the client
    left or the response is complete."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.left = asyncio.Event()
        self.stall = asyncio.Event()
        self.stall.set()
        self._asked = False

    async def receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("more_body"):
            await self.stall.wait()
        self.messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.left.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")

    @property
    def complete(self) -> bool:
        return any(m["type"] == "http.response.body" and not m.get("more_body") for m in self.messages)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(GUARD):
            while not predicate():  # noqa: ASYNC110 -- polls what the response wrote, which has no event
                await asyncio.sleep(0.005)


def scope(extensions: dict[str, Any] | None = None) -> Scope:
    return {"type": "http", "method": "GET", "path": "/api/sse", "headers": [], "extensions": extensions or {}}


@contextlib.asynccontextmanager
async def streaming(response: EventStreamResponse, client: Client, connection: Connection | None = None
                    ) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``response`` for ``client``; with ``connection``, under the host as ``alex-server serve`` runs it: the
    send is uvicorn's own, on that connection, and ``client`` only says when the client leaves."""
    if connection is None:
        running = asyncio.create_task(response(scope(), client.receive, client.send))
    else:
        extensions = {HANDOFF: Handoff(connection.send, enabled=False)}
        running = asyncio.create_task(response(scope(extensions), client.receive, connection.send))
    try:
        yield running
    finally:
        if not running.done():
            client.left.set()
        async with asyncio.timeout(GUARD):
            with contextlib.suppress(Exception):
                await running


async def test_a_stream_writes_its_head_the_opening_frame_and_each_batch_then_ends() -> None:
    source, client = Source(), Client()
    response = EventStreamResponse(source, heartbeat=60, send_timeout=120, headers={"Cache-Control": "no-cache"})
    async with streaming(response, client) as running:
        await client.until(lambda: connected_frame("s1") in client.body)
        source.publish(3)
        await client.until(lambda: sum(map(len, source.writes)) == 3)
        source.subscription.close("draining")
        await asyncio.wait_for(running, GUARD)
    start = client.messages[0]
    assert start["type"] == "http.response.start"
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"cache-control", b"no-cache") in start["headers"]
    assert not any(name == b"content-length" for name, _ in start["headers"])
    assert [event_id for batch in source.writes for event_id in batch] == [1, 2, 3]
    assert client.complete
    assert source.finished == [None]


async def test_a_heartbeat_goes_out_while_the_stream_waits_and_loses_no_event() -> None:
    source, client = Source(), Client()
    async with streaming(EventStreamResponse(source, heartbeat=0.03, send_timeout=1), client):
        await client.until(lambda: client.body.count(PING) >= 2)
        source.publish(2)
        await client.until(lambda: sum(map(len, source.writes)) == 2)
        await client.until(lambda: client.body.count(PING) >= 3)
    assert [event_id for batch in source.writes for event_id in batch] == [1, 2]


async def test_a_client_that_leaves_ends_the_stream() -> None:
    source, client = Source(), Client()
    async with streaming(EventStreamResponse(source, heartbeat=60, send_timeout=120), client) as running:
        await client.until(lambda: connected_frame("s1") in client.body)
        client.left.set()
        await asyncio.wait_for(running, GUARD)
    assert source.went
    assert source.finished == [None]


async def test_a_write_that_never_finishes_ends_the_stream_as_stalled() -> None:
    source, client = Source(), Client()
    async with streaming(EventStreamResponse(source, heartbeat=0.02, send_timeout=0.04), client) as running:
        await client.until(lambda: connected_frame("s1") in client.body)
        client.stall.clear()
        source.publish()
        await asyncio.wait_for(running, GUARD)
    assert source.finished == ["stalled"]
    assert not client.complete, "a stalled response is left unfinished: the server drops the connection"


class Connection:
    """uvicorn's own request cycle (httptools) on one end of a real socket pair; the test reads the other end."""

    def __init__(self, cycle: RequestResponseCycle, peer: socket.socket) -> None:
        self.cycle = cycle
        self.send = cast(Send, cycle.send)
        self.peer = peer
        self.received = b""

    async def read_until(self, predicate: Callable[[bytes], bool]) -> bytes:
        """The bytes the server wrote so far (as sent, chunked framing included), once ``predicate`` holds."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(GUARD):
            while not predicate(self.received):
                self.received += await loop.sock_recv(self.peer, 65536)
        return self.received

    def ids(self) -> list[bytes]:
        return [line for line in self.received.split(b"\n") if line.startswith(b"id: ")]


@contextlib.asynccontextmanager
async def uvicorn_connection() -> AsyncIterator[Connection]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    http_scope = cast(HTTPScope, scope())
    cycle = RequestResponseCycle(
        scope=http_scope, transport=transport, flow=FlowControl(transport),
        logger=logging.getLogger("test"), access_logger=logging.getLogger("test.access"), access_log=False,
        default_headers=[], message_event=asyncio.Event(), expect_100_continue=False, keep_alive=True,
        on_response=lambda: None)
    try:
        yield Connection(cycle, peer)
    finally:
        transport.close()
        peer.close()


async def test_the_socket_writer_knows_uvicorns_cycle_once_its_chunked_head_is_out() -> None:
    async with uvicorn_connection() as connection:
        send = connection.send
        assert socket_writer(send) is None, "no head yet: the framing is not known"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        writer = socket_writer(send)
        assert writer is not None
        assert writer.write(b"data: x\n\n")
        await connection.read_until(lambda got: got.endswith(b"9\r\ndata: x\n\n\r\n"))
        connection.cycle.flow.pause_writing()
        assert not writer.write(b"data: y\n\n"), "the socket takes no more bytes: nothing is written"
        connection.cycle.flow.resume_writing()
        assert writer.write(b"data: z\n\n"), "the socket takes bytes again"
        writer.end()
        assert not writer.write(b"data: y\n\n"), "the response is ending: nothing more is written"
        await connection.read_until(lambda got: got.endswith(b"9\r\ndata: z\n\n\r\n"))
        assert b"data: y" not in connection.received
    async with uvicorn_connection() as connection:
        await connection.send({"type": "http.response.start", "status": 200, "headers": []})
        writer = socket_writer(connection.send)
        assert writer is not None
        connection.cycle.transport.close()
        connection.cycle.disconnected = True  # what uvicorn's connection_lost sets
        assert not writer.write(b"data: y\n\n"), "the connection is closing"
    assert socket_writer(Client().send) is None


class CountingTransport:
    """The connection's real transport, with each ``write`` it is asked for recorded."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def counted_writer(connection: Connection) -> tuple[Any, CountingTransport]:
    """A socket writer on ``connection`` once its chunked head is out, over a transport that counts writes."""
    await connection.send({"type": "http.response.start", "status": 200, "headers": []})
    counting = CountingTransport(connection.cycle.transport)
    connection.cycle.transport = cast(Any, counting)
    writer = socket_writer(connection.send)
    assert writer is not None
    await asyncio.sleep(0)  # start in a turn of its own
    return writer, counting


def chunk(frame: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(frame), frame)


async def test_the_frames_a_connection_gets_after_the_first_in_one_turn_go_out_together_at_its_end() -> None:
    async with uvicorn_connection() as connection:
        writer, counting = await counted_writer(connection)
        frames = [b"id: %d\ndata: x\n\n" % n for n in range(1, 5)]
        assert all(writer.write(frame) for frame in frames[:3])
        assert counting.writes == [chunk(frames[0])], "the first frame of the turn goes out at once, the rest wait"
        await asyncio.sleep(0)  # the turn ends: what was held goes out in one write
        assert counting.writes == [chunk(frames[0]), chunk(frames[1]) + chunk(frames[2])]
        assert writer.write(frames[3])
        assert len(counting.writes) == 3, "a new turn: its first frame goes out at once again"
        received = await connection.read_until(lambda got: got.count(b"id: ") == 4)
        assert [line for line in received.split(b"\n") if line.startswith(b"id: ")] == [
            b"id: 1", b"id: 2", b"id: 3", b"id: 4"]


async def test_flushing_sends_what_was_held_before_the_streams_own_next_write() -> None:
    async with uvicorn_connection() as connection:
        writer, counting = await counted_writer(connection)
        assert writer.write(b"id: 1\n\n")
        assert writer.write(b"id: 2\n\n")
        writer.flush()
        await connection.send({"type": "http.response.body", "body": b"id: 3\n\n", "more_body": True})
        await asyncio.sleep(0)
        assert counting.writes == [chunk(b"id: 1\n\n"), chunk(b"id: 2\n\n"), chunk(b"id: 3\n\n")], \
            "nothing is left to go out at the turn's end"
        await connection.read_until(lambda got: got.count(b"id: ") == 3)
        assert connection.ids() == [b"id: 1", b"id: 2", b"id: 3"]


async def test_ending_the_writer_sends_what_was_held_and_stops_it_before_the_responses_last_message() -> None:
    async with uvicorn_connection() as connection:
        writer, counting = await counted_writer(connection)
        assert writer.write(b"id: 1\n\n")
        assert writer.write(b"id: 2\n\n")
        writer.end()
        assert counting.writes == [chunk(b"id: 1\n\n"), chunk(b"id: 2\n\n")]
        assert not writer.write(b"id: 3\n\n"), "an ended writer takes nothing (its response completes next)"
        await connection.send({"type": "http.response.body", "body": b"", "more_body": False})
        await asyncio.sleep(0)
        assert counting.writes == [chunk(b"id: 1\n\n"), chunk(b"id: 2\n\n"), b"0\r\n\r\n"]


async def test_frames_held_for_a_client_that_left_within_the_turn_are_dropped() -> None:
    async with uvicorn_connection() as connection:
        writer, counting = await counted_writer(connection)
        assert writer.write(b"id: 1\n\n")
        assert writer.write(b"id: 2\n\n")
        connection.cycle.disconnected = True
        await asyncio.sleep(0)
        assert counting.writes == [chunk(b"id: 1\n\n")]


async def test_under_uvicorn_an_idle_stream_writes_each_event_from_the_publishers_turn() -> None:
    source, client = Source(), Client()
    async with uvicorn_connection() as connection:
        async with streaming(EventStreamResponse(source, heartbeat=60, send_timeout=120), client, connection):
            await connection.read_until(lambda got: connected_frame("s1") in got)
            await asyncio.sleep(0.01)  # the writer parks on the subscription
            source.publish(3)
            # No await since publish: each frame went out within it, and the subscription holds nothing.
            assert source.subscription.pending == 0
            assert source.writes == [[1], [2], [3]]
            await connection.read_until(lambda got: got.count(b"id: ") == 3)
        assert connection.ids() == [b"id: 1", b"id: 2", b"id: 3"]
    assert source.finished == [None]


async def test_without_the_servers_send_events_wait_for_the_writers_turn() -> None:
    source, client = Source(), Client()
    async with streaming(EventStreamResponse(source, heartbeat=60, send_timeout=120), client):
        await client.until(lambda: connected_frame("s1") in client.body)
        await asyncio.sleep(0.01)
        source.publish(2)
        assert source.writes == []
        assert source.subscription.pending == 2
        await client.until(lambda: sum(map(len, source.writes)) == 2)


async def test_events_for_a_socket_that_takes_no_more_bytes_wait_for_it_in_order() -> None:
    source, client = Source(), Client()
    async with uvicorn_connection() as connection:
        async with streaming(EventStreamResponse(source, heartbeat=60, send_timeout=120), client, connection):
            await connection.read_until(lambda got: connected_frame("s1") in got)
            await asyncio.sleep(0.01)
            source.publish()
            connection.cycle.flow.pause_writing()  # as uvicorn does when the transport's buffer is full
            source.publish(3)
            assert source.writes == [[1]]
            await asyncio.sleep(0.02)
            assert source.writes == [[1]], "the writer's send waits for the socket"
            connection.cycle.flow.resume_writing()
            await connection.read_until(lambda got: got.count(b"id: ") == 4)
            source.publish()  # the writer waits again: straight through once more
            assert source.writes == [[1], [2, 3, 4], [5]]
            await connection.read_until(lambda got: got.count(b"id: ") == 5)
        assert connection.ids() == [b"id: 1", b"id: 2", b"id: 3", b"id: 4", b"id: 5"]


async def test_a_socket_that_never_takes_bytes_again_ends_the_stream_as_stalled() -> None:
    source, client = Source(), Client()
    async with uvicorn_connection() as connection:
        response = EventStreamResponse(source, heartbeat=0.02, send_timeout=0.04)
        async with streaming(response, client, connection) as running:
            await connection.read_until(lambda got: connected_frame("s1") in got)
            connection.cycle.flow.pause_writing()
            source.publish()
            await asyncio.wait_for(running, GUARD)
    assert source.finished == ["stalled"]
    assert source.writes == []


async def test_under_load_a_stream_batches_what_arrives_within_an_interval() -> None:
    source, client = Source(), Client()
    pacer = WritePacer(interval=0.1, lag=0.0)  # every event counts as late: the stream paces from the first
    async with streaming(EventStreamResponse(source, heartbeat=60, send_timeout=120, pacer=pacer), client):
        await client.until(lambda: connected_frame("s1") in client.body)
        source.publish()
        await client.until(lambda: len(source.writes) == 1)
        for _ in range(4):
            source.publish()
            await asyncio.sleep(0.005)
        await client.until(lambda: sum(map(len, source.writes)) == 5)
    assert source.writes == [[1], [2, 3, 4, 5]]


async def test_a_paced_stream_writes_early_when_its_buffer_fills() -> None:
    source, client = Source(buffer=4), Client()
    pacer = WritePacer(interval=30.0, lag=0.0)
    async with streaming(EventStreamResponse(source, heartbeat=60, send_timeout=120, pacer=pacer), client):
        await client.until(lambda: connected_frame("s1") in client.body)
        source.publish()
        await client.until(lambda: len(source.writes) == 1)
        source.publish()
        await asyncio.sleep(0.05)
        assert len(source.writes) == 1, "paced: it waits for its turn"
        source.publish()  # two pending: half of the buffer
        await client.until(lambda: len(source.writes) == 2)
    assert source.writes == [[1], [2, 3]]
    assert source.subscription.dropped == 0


async def test_cancelling_one_paced_wait_leaves_the_others() -> None:
    pacer = WritePacer(interval=0.05, lag=0.0)
    when = asyncio.get_running_loop().time() + 0.05
    first = asyncio.create_task(pacer.wait_until(when))
    second = asyncio.create_task(pacer.wait_until(when))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, GUARD)
    assert asyncio.get_running_loop().time() >= when
    assert first.cancelled()


async def test_the_host_carries_the_stream_after_the_framework_returned() -> None:
    source, client = Source(), Client()
    seen: dict[str, Any] = {}

    async def framework(inner: Scope, receive: Receive, send: Send) -> None:
        REQUEST.set("req-1")
        inner["route"] = "the framework's own"
        seen["handoff"] = inner["extensions"][HANDOFF]
        await EventStreamResponse(source, heartbeat=60, send_timeout=120)(inner, receive, send)
        seen["returned"] = not source.finished
        seen["handoff"].on_end.append(lambda: seen.setdefault("ended_in", REQUEST.get()))

    outer = scope()
    host = asyncio.create_task(StreamHost(framework, hand_off=True)(outer, client.receive, client.send))
    await client.until(lambda: connected_frame("s1") in client.body)
    assert seen["returned"], "the framework's call ended once the head was out"
    assert isinstance(seen["handoff"], Handoff)
    assert seen["handoff"].taken
    source.publish(2)
    await client.until(lambda: sum(map(len, source.writes)) == 2)
    assert not host.done()
    client.left.set()
    await asyncio.wait_for(host, GUARD)
    assert source.finished == [None]
    assert seen["ended_in"] == "req-1", "closing steps run in the request's context"
    assert "route" not in outer, "the framework worked on a copy of the scope"


async def test_a_host_without_hand_off_lets_the_stream_run_inside_the_framework() -> None:
    source, client = Source(), Client()
    returned: list[bool] = []

    async def framework(inner: Scope, receive: Receive, send: Send) -> None:
        await EventStreamResponse(source, heartbeat=60, send_timeout=120)(inner, receive, send)
        returned.append(bool(source.finished))

    host = asyncio.create_task(StreamHost(framework)(scope(), client.receive, client.send))
    await client.until(lambda: connected_frame("s1") in client.body)
    client.left.set()
    await asyncio.wait_for(host, GUARD)
    assert returned == [True], "the framework's call lasted as long as the stream"


async def test_a_stream_handed_off_by_a_request_that_then_failed_is_given_up() -> None:
    source, client = Source(), Client()

    async def framework(inner: Scope, receive: Receive, send: Send) -> None:
        await EventStreamResponse(source, heartbeat=60, send_timeout=120)(inner, receive, send)
        raise RuntimeError("a middleware failed after the head")

    with pytest.raises(RuntimeError, match="middleware"):
        await StreamHost(framework, hand_off=True)(scope(), client.receive, client.send)
    assert source.finished == [None]
