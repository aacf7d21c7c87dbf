"""One contract for every ``TaskBoard``: the in-process board and the Redis board, each through the port.

The Redis board runs on a real redis-server the module starts (emptied before each test), with a short lease so
that lease expiry fits in a unit test; its tasks live in a ``RedisSessionStore`` on the same Redis, since taking
and withdrawing read their stored status. Tasks are submitted as the runner does: reserve, store, enqueue. The last
section holds what only the Redis board promises: several replicas on one queue, cancels across replicas, leases.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio import Redis

from service.adapters.broker.tasks import LocalTaskBoard
from service.adapters.redis import tasks as redis_tasks
from service.adapters.redis.client import ControlBus, Keys, connect
from service.adapters.redis.sessions import RedisSessionStore
from service.adapters.redis.tasks import GROUP, TAKE_BLOCK_MS, RedisTaskBoard
from service.adapters.store.memory import MemorySessionStore
from service.app.ports import SessionStore, TaskBoard
from service.domain.errors import Conflict, LimitExceeded
from service.domain.models import Task, TaskStatus
from tests.redis_server import RedisServer, emptied, redis_server

LEASE_SECONDS = 1.0
INTERRUPTED = "gone"
CAP = 10
"""The per-owner cap of tests that are not about the cap."""


# --- the boards ---------------------------------------------------------------------------------------------------


@dataclass
class Board:
    """An opened board, the store its tasks live in, and what it told its bound callbacks."""

    board: TaskBoard
    store: SessionStore
    shared: bool
    """Other replicas use the same board (Redis)."""
    empty_take_seconds: float
    """How long a take with nothing queued is given to return ``[]`` by itself before ``stop_taking`` ends it."""
    cancels: list[tuple[str, str]] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def bind(self) -> None:
        async def on_reaped(task_id: str) -> None:
            self.reaped.append(task_id)

        self.board.bind(lambda task_id, reason: self.cancels.append((task_id, reason)), self.lost.append, on_reaped)

    async def aclose(self) -> None:
        closers, self.closers = self.closers, []
        for close in closers:
            await close()


async def local_board(url: str | None) -> Board:
    board = LocalTaskBoard()
    store = MemorySessionStore()
    opened = Board(board, store, shared=False, empty_take_seconds=0.1, closers=[board.close, store.close])
    opened.bind()
    await board.start()
    return opened


async def redis_board(url: str | None, replica: str = "r1", *, lease_seconds: float = LEASE_SECONDS,
                      control: bool = True) -> Board:
    """A replica's board; ``control=False``: its control channel never connects (every message to it is lost)."""
    assert url is not None
    redis = connect(url)
    blocking = connect(url, blocking=True)
    bus = ControlBus(redis)
    board = RedisTaskBoard(redis, blocking, bus, replica, lease_seconds=lease_seconds, interrupted_reason=INTERRUPTED)
    store = RedisSessionStore(redis)
    opened = Board(board, store, shared=True, empty_take_seconds=TAKE_BLOCK_MS / 1000 + 0.5,
                   closers=[board.close, bus.close, store.close, blocking.aclose, redis.aclose])
    opened.bind()
    if control:
        bus.start()
        await asyncio.wait_for(bus.connected.wait(), 5)
    await board.start()
    return opened


@pytest.fixture(scope="module")
def board_redis() -> Iterator[RedisServer]:
    with redis_server(persistent=False) as server:
        yield server



@pytest.fixture
async def redis_url(board_redis: RedisServer) -> str:
    return await emptied(board_redis)


@pytest.fixture(params=[pytest.param(local_board, id="local"), pytest.param(redis_board, id="redis")])
async def opened(request: pytest.FixtureRequest) -> AsyncIterator[Board]:
    url = await emptied(request.getfixturevalue("board_redis")) if request.param is redis_board else None
    board: Board = await request.param(url)
    try:
        yield board
    finally:
        await board.aclose()


def task(task_id: str, session_id: str, owner: str = "alice") -> Task:
    return Task(id=task_id, session_id=session_id, owner=owner, text=f"do {task_id}", trace_id="4bf9")


async def submit(board: Board, task_id: str, session_id: str | None = None, owner: str = "alice",
                 cap: int = CAP) -> Task:
    """As the runner submits: reserve the session and a place, store the task, then queue it."""
    made = task(task_id, session_id or f"s-{task_id}", owner)
    await board.board.reserve(made, cap)
    await board.store.create_task(made)
    await board.board.enqueue(made)
    return made


async def take_with_nothing_queued(board: Board) -> list[str]:
    """What a take hands out once nothing is queued. The Redis board's read returns ``[]`` after its blocking
    read; the local board waits for work, so ``stop_taking`` ends its wait (this is then its last take)."""
    taking = asyncio.create_task(board.board.take(10))
    done, _ = await asyncio.wait([taking], timeout=board.empty_take_seconds)
    if not done:
        board.board.stop_taking()
    return await asyncio.wait_for(taking, 2)


async def eventually(check: Callable[[], bool], within: float, what: str) -> None:
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110  (callbacks and timers: nothing to wait on but the clock)
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what} within {within} s")


# --- the TaskBoard contract ---------------------------------------------------------------------------------------


async def test_reserve_refuses_a_second_task_of_the_session_until_release(opened: Board) -> None:
    first = task("t1", "s1")
    await opened.board.reserve(first, CAP)
    with pytest.raises(Conflict, match="t1"):  # reserved, not yet queued
        await opened.board.reserve(task("t2", "s1"), CAP)
    await opened.store.create_task(first)
    await opened.board.enqueue(first)
    with pytest.raises(Conflict, match="t1"):  # queued
        await opened.board.reserve(task("t2", "s1"), CAP)
    assert await opened.board.take(10) == ["t1"]
    with pytest.raises(Conflict, match="t1"):  # running
        await opened.board.reserve(task("t2", "s1"), CAP)
    await opened.board.reserve(task("t3", "s2"), CAP)  # another session is free
    await opened.board.release(first)
    await opened.board.reserve(task("t2", "s1"), CAP)


async def test_reserve_refuses_an_owner_at_the_cap(opened: Board) -> None:
    first = await submit(opened, "t1", owner="alice", cap=2)
    await opened.board.reserve(task("t2", "s2", "alice"), 2)
    with pytest.raises(LimitExceeded):
        await opened.board.reserve(task("t3", "s3", "alice"), 2)
    assert await opened.board.session_task("s3") is None  # a refused reservation holds nothing
    await opened.board.reserve(task("t4", "s4", "bob"), 2)  # other owners are unaffected
    await opened.board.release(first)
    await opened.board.reserve(task("t3", "s3", "alice"), 2)


async def test_take_hands_each_task_once_in_order_at_most_limit(opened: Board) -> None:
    for n in range(5):
        await submit(opened, f"t{n}")
    assert await opened.board.take(2) == ["t0", "t1"]
    assert await opened.board.take(2) == ["t2", "t3"]
    assert await opened.board.take(10) == ["t4"]
    assert await take_with_nothing_queued(opened) == []


async def test_a_waiting_take_gets_a_task_queued_meanwhile(opened: Board) -> None:
    taking = asyncio.create_task(opened.board.take(10))
    await asyncio.sleep(0.1)
    await submit(opened, "t1")
    assert await asyncio.wait_for(taking, 3) == ["t1"]


async def test_a_withdrawn_task_is_never_taken(opened: Board) -> None:
    await submit(opened, "t1")
    await submit(opened, "t2")
    assert await opened.board.withdraw("t1") is True
    assert await opened.board.withdraw("t1") is False  # gone already
    assert await opened.board.take(10) == ["t2"]
    assert await take_with_nothing_queued(opened) == []


async def test_withdraw_of_a_taken_task_returns_false(opened: Board) -> None:
    await submit(opened, "t1")
    assert await opened.board.take(10) == ["t1"]
    assert await opened.board.withdraw("t1") is False
    assert await opened.board.withdraw("nobody") is False


async def test_request_cancel_of_a_held_task_calls_on_cancel(opened: Board) -> None:
    await submit(opened, "t1")
    assert await opened.board.take(10) == ["t1"]
    await opened.board.request_cancel("t1", "stop it")
    await eventually(lambda: ("t1", "stop it") in opened.cancels, 1.0, "on_cancel never called")
    assert {task_id for task_id, _ in opened.cancels} == {"t1"}


async def test_session_task_names_the_sessions_task_until_release(opened: Board) -> None:
    made = task("t1", "s1")
    assert await opened.board.session_task("s1") is None
    await opened.board.reserve(made, CAP)
    assert await opened.board.session_task("s1") == "t1"
    await opened.store.create_task(made)
    await opened.board.enqueue(made)
    assert await opened.board.session_task("s1") == "t1"
    assert await opened.board.take(10) == ["t1"]
    assert await opened.board.session_task("s1") == "t1"
    assert await opened.board.session_task("s2") is None
    await opened.board.release(made)
    assert await opened.board.session_task("s1") is None


async def test_release_frees_the_owners_place_of_a_task_that_ran(opened: Board) -> None:
    made = await submit(opened, "t1", cap=1)
    assert await opened.board.take(10) == ["t1"]
    with pytest.raises(LimitExceeded):
        await opened.board.reserve(task("t2", "s2"), 1)
    await opened.board.release(made)
    await opened.board.release(made)  # twice (a retried release) changes nothing
    await submit(opened, "t2", cap=1)
    assert await opened.board.take(10) == ["t2"]


async def test_stop_taking_ends_a_waiting_take_and_every_later_one(opened: Board) -> None:
    waiting = asyncio.create_task(opened.board.take(10))
    await asyncio.sleep(0.1)
    opened.board.stop_taking()
    await submit(opened, "t1")  # arrives while the stopped take may still be reading: it is not taken
    assert await asyncio.wait_for(waiting, 3) == []
    assert await asyncio.wait_for(opened.board.take(10), 3) == []
    assert await opened.board.withdraw("t1") is True  # it stayed queued


async def test_exclusive_only_for_a_board_of_one_process(opened: Board) -> None:
    assert opened.board.exclusive is (not opened.shared)


async def test_withdraw_all_returns_the_queued_tasks_of_an_exclusive_board_only(opened: Board) -> None:
    await submit(opened, "t1")
    assert await opened.board.take(1) == ["t1"]
    for task_id in ("t2", "t3"):
        await submit(opened, task_id)
    opened.board.stop_taking()
    withdrawn = await opened.board.withdraw_all()
    if opened.shared:
        assert withdrawn == []  # they stay queued for the other replicas
        assert await opened.board.withdraw("t2") is True
        assert await opened.board.withdraw("t3") is True
    else:
        assert withdrawn == ["t2", "t3"]  # the running one is not among them
        assert await opened.board.withdraw("t2") is False


# --- Redis only: several replicas on one board --------------------------------------------------------------------


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[Callable[..., Awaitable[Board]]]:
    """Opens replicas' boards on the emptied Redis; closes them all at the end."""
    opened: list[Board] = []

    async def open_replica(replica: str, **options: Any) -> Board:
        board = await redis_board(redis_url, replica, **options)
        opened.append(board)
        return board

    try:
        yield open_replica
    finally:
        for board in opened:
            await board.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client, to look at (or break) the keys by hand."""
    client = connect(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_each_task_is_taken_by_exactly_one_replica(replicas: Callable[..., Awaitable[Board]]) -> None:
    r1, r2 = await replicas("r1"), await replicas("r2")
    submitted = [f"t{n}" for n in range(8)]
    for task_id in submitted:
        await submit(r1, task_id)
    taken: dict[str, list[str]] = {"r1": [], "r2": []}
    async with asyncio.timeout(10):
        while len(taken["r1"]) + len(taken["r2"]) < len(submitted):
            first, second = await asyncio.gather(r1.board.take(3), r2.board.take(3))
            taken["r1"] += first
            taken["r2"] += second
    assert sorted(taken["r1"] + taken["r2"]) == submitted  # none twice, none lost
    for held in (r1, r2):
        for task_id in taken["r1"] if held is r1 else taken["r2"]:
            stored = await held.store.get_task(task_id)
            assert stored is not None
            assert stored.status is TaskStatus.RUNNING


async def test_a_draining_replica_leaves_its_queue_to_the_others(replicas: Callable[..., Awaitable[Board]]) -> None:
    r1, r2 = await replicas("r1"), await replicas("r2")
    reading = asyncio.create_task(r1.board.take(10))
    await asyncio.sleep(0.1)
    r1.board.stop_taking()
    await submit(r1, "t1")  # r1's read may receive it: it hands it back
    assert await asyncio.wait_for(reading, 3) == []
    assert await r1.board.withdraw_all() == []
    assert await asyncio.wait_for(r2.board.take(10), 3) == ["t1"]


async def test_a_cancel_on_another_replica_reaches_the_holder_over_the_control_channel(
    replicas: Callable[..., Awaitable[Board]],
) -> None:
    # A long lease: its renewal (which also finds cancel requests) does not run within the test.
    r1, r2 = await replicas("r1", lease_seconds=60.0), await replicas("r2", lease_seconds=60.0)
    await submit(r2, "t1")
    assert await r1.board.take(10) == ["t1"]
    await r2.board.request_cancel("t1", "stop it")
    await eventually(lambda: r1.cancels == [("t1", "stop it")], 1.0, "the cancel never reached the holder")
    assert r2.cancels == []


async def test_a_cancel_the_holder_missed_reaches_it_at_its_next_renewal(
    replicas: Callable[..., Awaitable[Board]],
) -> None:
    r1 = await replicas("r1", control=False)
    r2 = await replicas("r2")
    await submit(r2, "t1")
    assert await r1.board.take(10) == ["t1"]
    await r2.board.request_cancel("t1", "stop it")
    await eventually(lambda: ("t1", "stop it") in r1.cancels, 2 * LEASE_SECONDS, "the cancel key was never read")


async def test_a_dead_replicas_task_is_declared_interrupted_by_another(
    replicas: Callable[..., Awaitable[Board]],
) -> None:
    r1, r2 = await replicas("r1"), await replicas("r2")
    made = await submit(r1, "t1", cap=1)
    assert await r1.board.take(10) == ["t1"]
    assert isinstance(r1.board, RedisTaskBoard)
    await r1.board.close()  # r1 dies: it stops renewing, and never releases
    await eventually(lambda: r2.reaped == ["t1"], 3 * LEASE_SECONDS, "the task was never reaped")
    stored = await r2.store.get_task("t1")
    assert stored is not None
    assert stored.status is TaskStatus.INTERRUPTED
    assert stored.error == INTERRUPTED
    assert stored.finished_at is not None
    assert await r2.board.session_task(made.session_id) is None
    await r2.board.reserve(task("t2", made.session_id), 1)  # the session and the owner's only place are free
    await asyncio.sleep(LEASE_SECONDS)
    assert r2.reaped == ["t1"]  # once


async def test_a_lease_lapsed_under_a_live_holder_is_taken_back(
    replicas: Callable[..., Awaitable[Board]], raw: Redis,
) -> None:
    r1, r2 = await replicas("r1"), await replicas("r2")
    await submit(r1, "t1")
    assert await r1.board.take(10) == ["t1"]
    lease = Keys().lease("t1")
    assert await raw.delete(lease) == 1  # as after an outage longer than the lease
    await asyncio.sleep(2.0)
    assert r2.reaped == []
    assert r1.lost == []
    assert await raw.get(lease) == "r1"
    stored = await r1.store.get_task("t1")
    assert stored is not None
    assert stored.status is TaskStatus.RUNNING


async def test_a_holder_whose_task_was_settled_elsewhere_is_told_it_lost_it(
    replicas: Callable[..., Awaitable[Board]], raw: Redis,
) -> None:
    r1 = await replicas("r1")
    await submit(r1, "t1")
    assert await r1.board.take(10) == ["t1"]
    await raw.set(Keys().lease("t1"), "r9")  # another replica holds it now (it declared r1 gone)
    await eventually(lambda: r1.lost == ["t1"], 2 * LEASE_SECONDS, "on_lost never called")


async def test_a_reservation_never_queued_lapses(
    replicas: Callable[..., Awaitable[Board]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_tasks, "RESERVATION_SECONDS", 0.3)
    r1 = await replicas("r1")
    await r1.board.reserve(task("t1", "s1"), 1)  # its replica stops before it stores and queues it
    queued = await submit(r1, "t2", "s2", cap=2)  # a queued one does not lapse
    with pytest.raises(Conflict, match="t1"):
        await r1.board.reserve(task("t3", "s1"), 2)
    await asyncio.sleep(0.5)
    assert await r1.board.session_task("s1") is None
    assert await r1.board.session_task("s2") == "t2"
    await r1.board.reserve(task("t3", "s1"), 2)  # the lapsed one's owner place is free too
    with pytest.raises(LimitExceeded):
        await r1.board.reserve(task("t4", "s4"), 2)
    assert queued.id in await r1.board.take(10)


async def test_a_task_received_by_a_replica_that_died_before_starting_it_goes_to_another(
    replicas: Callable[..., Awaitable[Board]], raw: Redis,
) -> None:
    r2 = await replicas("r2")
    await submit(r2, "t1")
    # r1 reads the entry from the queue and dies before it starts the task.
    received: Any = await raw.xreadgroup(GROUP, "r1", {Keys().queue: ">"}, count=1)
    assert received
    taken: list[str] = []
    async with asyncio.timeout(3 * LEASE_SECONDS + 2):
        while not taken:
            taken = await r2.board.take(10)
    assert taken == ["t1"]

