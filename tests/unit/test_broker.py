"""The in-process broker: session filtering, order, batching, overflow, close."""

from __future__ import annotations

import asyncio

import pytest

from service.adapters.broker.memory import SLOW_CLIENT, BufferedSubscription, MemoryBroker
from service.domain.events import StoredEvent, Thinking


def stored(event_id: int, session_id: str = "s1") -> StoredEvent:
    return StoredEvent.encode(event_id, Thinking(session_id=session_id, task_id="t1", delta=f"d{event_id}"))


def ids(events: list[StoredEvent]) -> list[int]:
    return [event.id for event in events]


def frame_id(frame: bytes) -> int:
    """The id of an event's SSE frame (its first line, ``id: N``)."""
    return int(frame.split(b"\n", 1)[0].removeprefix(b"id: "))


async def test_a_subscriber_gets_only_its_session() -> None:
    broker = MemoryBroker()
    mine = broker.subscribe("s1", 10)
    other = broker.subscribe("s2", 10)
    broker.publish(stored(1, "s1"))
    broker.publish(stored(2, "s2"))
    broker.publish(stored(3, "s1"))
    assert ids(await mine.next_batch()) == [1, 3]
    assert ids(await other.next_batch()) == [2]


async def test_every_subscriber_of_a_session_gets_every_event_in_order() -> None:
    broker = MemoryBroker()
    subscriptions = [broker.subscribe("s1", 100) for _ in range(3)]
    for event_id in range(1, 51):
        broker.publish(stored(event_id))
    for subscription in subscriptions:
        assert ids(await subscription.next_batch()) == list(range(1, 51))
    assert broker.subscriber_count("s1") == 3


async def test_next_batch_returns_everything_pending_at_once() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    broker.publish(stored(1))
    broker.publish(stored(2))
    assert ids(await subscription.next_batch()) == [1, 2]
    assert subscription.pending == 0
    broker.publish(stored(3))
    assert ids(await subscription.next_batch()) == [3]


async def test_a_waiting_reader_wakes_on_publish() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    reader = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    assert not reader.done()
    broker.publish(stored(1))
    broker.publish(stored(2))
    # Both events published before the reader ran arrive in one batch.
    assert ids(await asyncio.wait_for(reader, 1)) == [1, 2]


async def test_events_published_before_subscribing_are_not_delivered() -> None:
    broker = MemoryBroker()
    broker.publish(stored(1))
    subscription = broker.subscribe("s1", 10)
    broker.publish(stored(2))
    assert ids(await subscription.next_batch()) == [2]


async def test_overflow_drops_everything_pending_and_closes_as_slow_client() -> None:
    broker = MemoryBroker()
    slow = broker.subscribe("s1", 3)
    fast = broker.subscribe("s1", 100)
    for event_id in range(1, 4):
        broker.publish(stored(event_id))
    assert slow.close_reason is None
    broker.publish(stored(4))  # the fourth while three are pending: over the buffer
    assert slow.closed
    assert slow.close_reason == SLOW_CLIENT
    assert slow.dropped == 4
    assert await slow.next_batch() == []
    assert broker.subscriber_count("s1") == 1
    broker.publish(stored(5))
    assert slow.dropped == 4  # no longer subscribed: nothing more reaches it
    assert ids(await fast.next_batch()) == [1, 2, 3, 4, 5]
    assert fast.dropped == 0


async def test_a_reader_that_keeps_up_never_overflows() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 2)
    received: list[int] = []
    for event_id in range(1, 21, 2):
        broker.publish(stored(event_id))
        broker.publish(stored(event_id + 1))
        received += ids(await subscription.next_batch())
    assert received == list(range(1, 21))
    assert subscription.close_reason is None


async def test_overflow_wakes_a_waiting_reader_with_an_empty_batch() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 1)
    broker.publish(stored(1))
    assert ids(await subscription.next_batch()) == [1]
    reader = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    broker.publish(stored(2))
    broker.publish(stored(3))  # overflows before the reader ran
    assert await asyncio.wait_for(reader, 1) == []
    assert subscription.dropped == 2


async def test_close_wakes_a_waiting_reader() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    reader = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    subscription.close("client_gone")
    assert await asyncio.wait_for(reader, 1) == []
    assert subscription.close_reason == "client_gone"


async def test_pending_events_are_still_returned_after_a_normal_close() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    broker.publish(stored(1))
    subscription.close("draining")
    broker.publish(stored(2))
    assert ids(await subscription.next_batch()) == [1]
    assert await subscription.next_batch() == []
    assert await subscription.next_batch() == []
    assert subscription.dropped == 0


async def test_close_unsubscribes_and_is_idempotent() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    subscription.close("first")
    subscription.close("second")
    assert subscription.close_reason == "first"
    assert broker.subscriber_count("s1") == 0
    assert broker.subscriber_count() == 0
    broker.publish(stored(1))
    assert subscription.pending == 0


async def test_close_all_ends_every_reader() -> None:
    broker = MemoryBroker()
    subscriptions = [broker.subscribe(f"s{n}", 10) for n in range(3)]
    readers = [asyncio.create_task(subscription.next_batch()) for subscription in subscriptions]
    await asyncio.sleep(0)
    broker.close_all("draining")
    assert await asyncio.wait_for(asyncio.gather(*readers), 1) == [[], [], []]
    assert {subscription.close_reason for subscription in subscriptions} == {"draining"}
    assert broker.subscriber_count() == 0


async def test_a_cancelled_reader_leaves_the_subscription_usable() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    reader = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    broker.publish(stored(1))
    assert ids(await subscription.next_batch()) == [1]


async def test_one_reader_at_a_time() -> None:
    subscription = MemoryBroker().subscribe("s1", 10)
    first = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await subscription.next_batch()
    subscription.close()
    assert await first == []


def test_the_buffer_holds_at_least_one_event() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        BufferedSubscription("s1", 0)


async def test_many_subscribers_one_overflowing_does_not_disturb_the_others() -> None:
    broker = MemoryBroker()
    subscriptions = [broker.subscribe("s1", 5 if n % 2 else 50) for n in range(1000)]
    for event_id in range(1, 11):
        broker.publish(stored(event_id))
    small = subscriptions[1::2]
    large = subscriptions[0::2]
    assert all(s.close_reason == SLOW_CLIENT and s.dropped == 6 for s in small)
    assert broker.subscriber_count("s1") == len(large)
    for subscription in large:
        assert ids(await subscription.next_batch()) == list(range(1, 11))


async def test_a_reader_that_asked_hears_when_half_its_buffer_is_pending() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    heard: list[int] = []
    subscription.notify_when_filling(lambda: heard.append(subscription.pending))
    for event_id in range(1, 5):
        broker.publish(stored(event_id))
    assert heard == []
    broker.publish(stored(5))
    assert heard == [5]
    broker.publish(stored(6))
    assert heard == [5], "once per crossing, not once per event"
    assert ids(await subscription.next_batch()) == [1, 2, 3, 4, 5, 6]
    for event_id in range(7, 12):
        broker.publish(stored(event_id))
    assert heard == [5, 5], "and again once the reader took the batch and it fills up anew"
    subscription.notify_when_filling(None)
    await subscription.next_batch()
    for event_id in range(12, 17):
        broker.publish(stored(event_id))
    assert heard == [5, 5]


async def test_a_parked_reader_is_woken_not_notified() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 2)
    heard: list[int] = []
    subscription.notify_when_filling(lambda: heard.append(subscription.pending))
    reader = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    broker.publish(stored(1))  # half of two, but the reader is waiting: the wake-up is enough
    assert ids(await asyncio.wait_for(reader, 1)) == [1]
    assert heard == []


async def parked(subscription: BufferedSubscription) -> asyncio.Task[list[StoredEvent]]:
    """A reader waiting in ``next_batch``."""
    reading = asyncio.create_task(subscription.next_batch())
    await asyncio.sleep(0)
    return reading


async def test_what_waiting_readers_take_is_accounted_once_per_event_for_all_of_them() -> None:
    broker = MemoryBroker()
    written: list[bytes] = []
    accounts: list[tuple[int, int]] = []
    refusing: list[int] = []

    class Account:
        def taken(self, event: StoredEvent, count: int) -> None:
            assert len(written) % 3 == 0, "told once every subscription had its offer"
            accounts.append((event.id, count))

    account = Account()

    def offer(frame: bytes) -> bool:
        written.append(frame)
        return True

    def refuse(frame: bytes) -> bool:
        refusing.append(frame_id(frame))
        return False

    subscriptions = [broker.subscribe("s1", 10) for _ in range(5)]
    for subscription in subscriptions[:3]:
        subscription.write_through(offer, account.taken)  # a bound method made anew each time: equal, not the same
    subscriptions[3].write_through(refuse, account.taken)
    readers = [await parked(subscription) for subscription in subscriptions]
    first, second = stored(1), stored(2)
    broker.publish(first)
    broker.publish(second)
    assert accounts == [(1, 3), (2, 3)], "refused and plain subscriptions are not counted"
    assert written == [first.frame] * 3 + [second.frame] * 3
    assert [(s.last_id, s.offered) for s in subscriptions] == [(2, 2), (2, 2), (2, 2), (0, 0), (0, 0)], \
        "what an offer took moves the reader's place and counts; the rest is the reader's to take"
    assert refusing == [1], "once it buffered one event, the next waits behind it without an offer"
    for reader in readers[:3]:
        assert not reader.done(), "what the offer took wakes nobody"
        reader.cancel()
    for reader in readers[3:]:
        assert ids(await reader) == [1, 2], "buffered, in order"


async def test_an_offer_set_while_the_reader_waits_applies_at_once_and_none_once_closed() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    offered: list[int] = []

    def offer(frame: bytes) -> bool:
        offered.append(frame_id(frame))
        return True

    reader = await parked(subscription)
    subscription.write_through(offer)
    broker.publish(stored(1))
    assert offered == [1]
    assert not reader.done()
    subscription.close("client_gone")
    broker.publish(stored(2))
    assert offered == [1], "a closed subscription is offered nothing"
    assert await reader == []


async def test_an_event_at_or_below_the_readers_place_is_buffered_without_an_offer() -> None:
    broker = MemoryBroker()
    subscription = broker.subscribe("s1", 10)
    subscription.last_id = 5  # the reader had up to 5 already (a replay)
    offered: list[int] = []

    def offer(frame: bytes) -> bool:
        offered.append(frame_id(frame))
        return True

    subscription.write_through(offer)
    reader = await parked(subscription)
    broker.publish(stored(5))
    assert offered == [], "a live copy of an event the reader had is not written again"
    assert ids(await reader) == [5], "it is buffered, for the reader to skip"
    reader = await parked(subscription)
    broker.publish(stored(6))
    assert offered == [6]
    assert (subscription.last_id, subscription.offered) == (6, 1)
    assert not reader.done()
    reader.cancel()
