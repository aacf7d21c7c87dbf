"""The event-stream response at the ASGI level: writes, heartbeats, leaving clients, stalls, paced writes, the host."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from service.adapters.broker.memory import MemoryBroker
from service.api.sse import PING, EventStreamResponse, WritePacer
from service.api.stream_host import HANDOFF, Handoff, StreamHost
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


def scope() -> Scope:
    return {"type": "http", "method": "GET", "path": "/api/sse", "headers": [], "extensions": {}}


@contextlib.asynccontextmanager
async def streaming(response: EventStreamResponse, client: Client) -> AsyncIterator[asyncio.Task[None]]:
    running = asyncio.create_task(response(scope(), client.receive, client.send))
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
