"""TaskRunner, SessionFeed and SessionService over the in-memory store, log and broker, with a scripted model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from service.adapters.broker.memory import MemoryBroker
from service.adapters.broker.tasks import LocalTaskBoard
from service.adapters.store.memory import MemoryEventLog, MemorySessionStore
from service.adapters.tools.todo import TodoReadTool, TodoWriteTool
from service.app.access import DEFAULT_SCOPES, Principal
from service.app.runner import INTERRUPTED_BY_RESTART, INTERRUPTED_BY_SHUTDOWN, TaskRunner
from service.app.sessions import SessionService
from service.app.stream import REPLAY_PAGE, LogSink, SessionFeed, emit_burst
from service.app.workspaces import Workspaces
from service.domain.engine import EngineConfig, ReactEngine
from service.domain.errors import Conflict, Invalid, LimitExceeded, NotFound, Unavailable
from service.domain.events import StoredEvent, Thinking
from service.domain.llm import LLMError
from service.domain.models import Session, Task, TaskStatus
from service.domain.tools import Tool, ToolRegistry
from tests.unit.fakes import EchoTool, Gated, ScriptedModel, SlowTool, Turn, answer, call, tool_turn

ALICE = Principal("alice", frozenset(DEFAULT_SCOPES))
BOB = Principal("bob", frozenset(DEFAULT_SCOPES))
ADMIN = Principal("root", frozenset({*DEFAULT_SCOPES, "admin"}))
TRACE = "0af7651916cd43dd8448eb211c80319c"
GUARD_SECONDS = 10
"""A bound on waits for something that must happen: a bug fails the test instead of hanging the run."""


class ObservedStore(MemorySessionStore):
    """The in-memory store, telling the test when a task is stored finished (the runner's last write)."""

    def __init__(self) -> None:
        super().__init__()
        self._finished: dict[str, asyncio.Event] = {}
        self.saving = asyncio.Event()
        self._saves_open: asyncio.Event | None = None

    def hold_saves(self) -> None:
        """Make ``save_messages`` wait (as a real database does) until :meth:`release_saves`."""
        self._saves_open = asyncio.Event()

    def release_saves(self) -> None:
        assert self._saves_open is not None
        self._saves_open.set()

    async def save_messages(self, session_id: str, messages: Sequence[dict[str, Any]]) -> None:
        self.saving.set()
        if self._saves_open is not None:
            await self._saves_open.wait()
        await super().save_messages(session_id, messages)

    def _flag(self, task_id: str) -> asyncio.Event:
        return self._finished.setdefault(task_id, asyncio.Event())

    async def update_task(self, task: Task) -> None:
        await super().update_task(task)
        if task.status.finished:
            self._flag(task.id).set()

    async def finished(self, task_id: str) -> Task:
        async with asyncio.timeout(GUARD_SECONDS):
            await self._flag(task_id).wait()
        task = await self.get_task(task_id)
        assert task is not None
        return task


@dataclass
class Rig:
    runner: TaskRunner
    store: ObservedStore
    log: MemoryEventLog
    broker: MemoryBroker
    model: ScriptedModel
    workspaces: Workspaces

    async def events(self, session_id: str) -> list[StoredEvent]:
        return await self.log.read_after(session_id, 0, 10_000)

    async def types(self, session_id: str) -> list[str]:
        return [event.event_type for event in await self.events(session_id)]

    def sessions(self, max_streams_per_client: int = 20) -> SessionService:
        return SessionService(self.store, self.log, self.runner, self.workspaces, stream_buffer_size=100,
                              max_streams_per_client=max_streams_per_client)


def make_rig(
    root: Path, turns: Iterable[Turn] = (), tools: Iterable[Tool] = (), *, max_tasks_per_client: int = 4,
    max_task_chars: int = 1000, concurrency: int = 8,
) -> Rig:
    broker = MemoryBroker()
    log = MemoryEventLog(broker)
    store = ObservedStore()
    model = ScriptedModel(turns)
    workspaces = Workspaces(root / "workspaces")
    engine = ReactEngine(model, ToolRegistry(tools), EngineConfig(system_prompt="sys"))
    runner = TaskRunner(store, log, engine, workspaces, max_task_chars=max_task_chars,
                        max_tasks_per_client=max_tasks_per_client, board=LocalTaskBoard(), concurrency=concurrency)
    return Rig(runner, store, log, broker, model, workspaces)


RigFactory = Callable[..., Rig]


@pytest.fixture(autouse=True)
def caller_trace() -> Iterator[None]:
    """Tasks here are submitted as from a request whose ``traceparent`` names the trace ``TRACE``."""
    parent = SpanContext(int(TRACE, 16), 0x00F067AA0BA902B7, is_remote=True, trace_flags=TraceFlags(1))
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
    yield
    otel_context.detach(token)


@pytest.fixture
async def rigs(tmp_path: Path) -> AsyncIterator[RigFactory]:
    """``make_rig`` whose runners are shut down after the test, so no task outlives it."""
    made: list[Rig] = []

    def factory(turns: Iterable[Turn] = (), tools: Iterable[Tool] = (), **limits: Any) -> Rig:
        rig = make_rig(tmp_path, turns, tools, **limits)
        made.append(rig)
        return rig

    yield factory
    for rig in made:
        await rig.runner.shutdown(0)


# Submitting and running --------------------------------------------------------------------------------------------


async def test_submit_returns_queued_and_the_task_completes_with_its_events(rigs: RigFactory) -> None:
    rig = rigs([tool_turn(call("echo", {"text": "a.txt"}), prompt_tokens=10, completion_tokens=2),
                answer("One file.", prompt_tokens=20, completion_tokens=3)], [EchoTool()])

    task = await rig.runner.submit(ALICE, "list the files")

    assert task.status is TaskStatus.QUEUED
    assert (task.owner, task.text, task.trace_id) == ("alice", "list the files", TRACE)
    assert task.session_id.startswith("s_")
    assert rig.runner.running_count == 0  # queued: the worker takes it on its next turn
    done = await rig.store.finished(task.id)
    assert done.status is TaskStatus.COMPLETED
    assert done.final_answer == "One file."
    assert done.iterations == 2
    assert done.usage == {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}
    assert done.error is None
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.started_at <= done.finished_at
    assert rig.runner.running_count == 0

    events = await rig.events(task.session_id)
    assert events[0].event_type == "task_analysis"
    assert events[-1].event_type == "task_complete"
    assert "tool_call_complete" in [e.event_type for e in events]
    assert {(e.task_id, e.to_dict()["trace_id"]) for e in events} == {(task.id, TRACE)}
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))


async def test_the_sessions_messages_are_saved_and_the_next_task_continues_them(rigs: RigFactory) -> None:
    rig = rigs([tool_turn(call("echo", {"text": "a.txt"}, "call_1")), answer("One file."), answer("Still one.")],
               [EchoTool()])

    first = await rig.runner.submit(ALICE, "list the files", "s_chat")
    await rig.store.finished(first.id)

    session = await rig.store.get_session("s_chat")
    assert session is not None
    assert session.owner == "alice"
    assert [(m["role"], m["content"]) for m in session.messages] == [
        ("system", "sys"), ("user", "list the files"), ("assistant", ""), ("tool", "a.txt"),
        ("assistant", "One file."),
    ]
    assert session.messages[3]["tool_call_id"] == "call_1"
    assert (rig.workspaces.root / "s_chat").is_dir()

    second = await rig.runner.submit(ALICE, "and now?", "s_chat")
    await rig.store.finished(second.id)
    sent = rig.model.requests[2]
    assert [m.content for m in sent] == ["sys", "list the files", "", "a.txt", "One file.", "and now?"]


async def test_a_task_reads_the_todos_earlier_tasks_left_and_its_own_writes(rigs: RigFactory) -> None:
    first_list = [{"id": "1", "content": "look around", "status": "in_progress"}]
    second_list = [{"id": "1", "content": "look around", "status": "completed"},
                   {"id": "2", "content": "answer", "status": "pending"}]
    rig = rigs([tool_turn(call("todo_write", {"todos": first_list})), answer("Planned."),
                tool_turn(call("todo_read", {}, "call_2")),
                tool_turn(call("todo_write", {"todos": second_list}, "call_3")),
                tool_turn(call("todo_read", {}, "call_4")), answer("Done.")],
               [TodoReadTool(), TodoWriteTool()])

    first = await rig.runner.submit(ALICE, "plan", "s_todos")
    await rig.store.finished(first.id)
    second = await rig.runner.submit(ALICE, "go on", "s_todos")
    await rig.store.finished(second.id)

    results = [e.to_dict()["result"] for e in await rig.events("s_todos") if e.event_type == "tool_call_complete"]
    assert results[1] == "[~] 1. look around"  # left by the first task, read by the second
    assert results[3] == "[x] 1. look around\n[ ] 2. answer"  # the second task's own write
    assert [todo.to_dict() for todo in await rig.store.get_todos("s_todos")] == second_list


async def test_the_task_can_be_read_by_its_owner_and_an_admin_only(rigs: RigFactory) -> None:
    rig = rigs([answer("hi")])
    task = await rig.runner.submit(ALICE, "hello")
    await rig.store.finished(task.id)

    assert (await rig.runner.get(ALICE, task.id)).final_answer == "hi"
    assert (await rig.runner.get(ADMIN, task.id)).id == task.id
    with pytest.raises(NotFound):
        await rig.runner.get(BOB, task.id)
    with pytest.raises(NotFound):
        await rig.runner.get(ALICE, "t_missing")


async def test_a_model_failure_fails_the_task_visibly(rigs: RigFactory) -> None:
    rig = rigs([LLMError("upstream down", kind="server")])
    task = await rig.runner.submit(ALICE, "hello")

    done = await rig.store.finished(task.id)

    assert done.status is TaskStatus.FAILED
    assert done.error is not None
    assert "upstream down" in done.error
    [error] = [e.to_dict() for e in await rig.events(task.session_id) if e.event_type == "error"]
    assert (error["error"], error["recoverable"]) == (done.error, False)


async def test_a_crash_in_the_engine_fails_the_task_and_frees_the_session(rigs: RigFactory) -> None:
    rig = rigs([RuntimeError("a bug"), answer("fine now")])
    task = await rig.runner.submit(ALICE, "hello", "s_crash")

    done = await rig.store.finished(task.id)

    assert done.status is TaskStatus.FAILED
    assert done.error == "internal error: RuntimeError"
    assert (await rig.types("s_crash"))[-1] == "error"
    again = await rig.runner.submit(ALICE, "again", "s_crash")
    assert (await rig.store.finished(again.id)).status is TaskStatus.COMPLETED


@pytest.mark.parametrize(("text", "limit"), [("", 100), ("   \n", 100), ("x" * 101, 100)])
async def test_an_empty_or_oversized_task_is_invalid(rigs: RigFactory, text: str, limit: int) -> None:
    rig = rigs(max_task_chars=limit)
    with pytest.raises(Invalid):
        await rig.runner.submit(ALICE, text)
    assert rig.runner.running_count == 0


# One task a session, a few a client, sessions are private ----------------------------------------------------------


async def test_a_second_task_on_a_running_session_is_a_conflict(rigs: RigFactory) -> None:
    gate = asyncio.Event()
    rig = rigs([Gated(gate, answer("first")), answer("third")])

    first = await rig.runner.submit(ALICE, "one", "s_busy")
    with pytest.raises(Conflict):
        await rig.runner.submit(ALICE, "two", "s_busy")  # still queued
    await rig.model.until_parked()
    with pytest.raises(Conflict):
        await rig.runner.submit(ALICE, "two", "s_busy")  # running

    gate.set()
    assert (await rig.store.finished(first.id)).status is TaskStatus.COMPLETED
    third = await rig.runner.submit(ALICE, "three", "s_busy")
    assert (await rig.store.finished(third.id)).final_answer == "third"


async def test_a_client_runs_at_most_max_tasks_per_client(rigs: RigFactory) -> None:
    gate = asyncio.Event()
    rig = rigs([Gated(gate), Gated(gate), answer()], max_tasks_per_client=1)

    first = await rig.runner.submit(ALICE, "one", "s_a")
    with pytest.raises(LimitExceeded):
        await rig.runner.submit(ALICE, "two", "s_b")
    others = await rig.runner.submit(BOB, "bob's", "s_c")  # the cap is per client

    gate.set()
    await rig.store.finished(first.id)
    await rig.store.finished(others.id)
    later = await rig.runner.submit(ALICE, "two", "s_b")
    assert (await rig.store.finished(later.id)).status is TaskStatus.COMPLETED


async def test_another_subjects_session_id_is_not_found(rigs: RigFactory) -> None:
    rig = rigs([answer("mine")])
    task = await rig.runner.submit(ALICE, "mine", "s_private")
    await rig.store.finished(task.id)
    before = await rig.events("s_private")

    with pytest.raises(NotFound):
        await rig.runner.submit(BOB, "let me in", "s_private")

    assert await rig.events("s_private") == before
    found = await rig.store.find_tasks("s_private", list(TaskStatus))
    assert [t.owner for t in found] == ["alice"]


@pytest.mark.parametrize("session_id", ["../escape", "a/b", ".", "..", "x" * 129, "spaces here"])
async def test_an_unsafe_session_id_is_not_found(rigs: RigFactory, session_id: str) -> None:
    rig = rigs()
    with pytest.raises(NotFound):
        await rig.runner.submit(ALICE, "hello", session_id)
    assert await rig.store.list_sessions(None) == []


# The queue ---------------------------------------------------------------------------------------------------------


async def test_at_most_concurrency_tasks_run_and_the_rest_wait_queued(rigs: RigFactory) -> None:
    gate = asyncio.Event()
    rig = rigs([Gated(gate, answer("done")) for _ in range(4)], concurrency=2, max_tasks_per_client=10)
    tasks = [await rig.runner.submit(ALICE, f"task {n}", f"s_q{n}") for n in range(4)]
    async with asyncio.timeout(GUARD_SECONDS):
        while True:  # the worker starts them on its own turns
            if rig.runner.running_count >= 2:
                break
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # time for a wrongly started third one to show

    assert rig.runner.running_count == 2
    statuses = [(await rig.store.get_task(task.id)).status for task in tasks]  # type: ignore[union-attr]
    assert statuses == [TaskStatus.RUNNING, TaskStatus.RUNNING, TaskStatus.QUEUED, TaskStatus.QUEUED]

    gate.set()
    for task in tasks:
        assert (await rig.store.finished(task.id)).status is TaskStatus.COMPLETED


async def test_cancelling_a_queued_task_settles_it_at_once_without_running_it(rigs: RigFactory) -> None:
    gate = asyncio.Event()
    rig = rigs([Gated(gate, answer("done")), answer("again")], concurrency=1)
    first = await rig.runner.submit(ALICE, "busy", "s_first")
    waiting = await rig.runner.submit(ALICE, "waits", "s_waiting")
    await rig.model.until_parked()

    cancelled = await rig.runner.cancel(ALICE, waiting.id, reason="not needed")

    assert cancelled.status is TaskStatus.CANCELLED
    stored = await rig.store.get_task(waiting.id)
    assert stored is not None
    assert (stored.status, stored.started_at) == (TaskStatus.CANCELLED, None)
    assert await rig.types("s_waiting") == ["task_cancelled"]
    assert (await rig.events("s_waiting"))[0].to_dict()["reason"] == "not needed"
    # Its session and its owner's place are free again.
    again = await rig.runner.submit(ALICE, "now", "s_waiting")
    gate.set()
    assert (await rig.store.finished(first.id)).status is TaskStatus.COMPLETED
    assert (await rig.store.finished(again.id)).status is TaskStatus.COMPLETED


async def test_queue_wait_is_measured_from_submission(rigs: RigFactory) -> None:
    gate = asyncio.Event()
    rig = rigs([Gated(gate, answer("done")), answer("two")], concurrency=1)
    await rig.runner.submit(ALICE, "busy", "s_busy_one")
    second = await rig.runner.submit(ALICE, "waits", "s_busy_two")
    await rig.model.until_parked()
    await asyncio.sleep(0.05)
    gate.set()
    done = await rig.store.finished(second.id)
    assert done.started_at is not None
    assert (done.started_at - done.created_at).total_seconds() >= 0.05


# Cancelling --------------------------------------------------------------------------------------------------------


async def test_cancel_stops_a_running_task(rigs: RigFactory) -> None:
    rig = rigs([Gated(asyncio.Event())])
    task = await rig.runner.submit(ALICE, "think forever", "s_cancel")
    await rig.model.until_parked()

    await rig.runner.cancel(ALICE, task.id, reason="changed my mind")
    await rig.runner.cancel(ALICE, task.id, reason="again")  # idempotent while it stops

    done = await rig.store.finished(task.id)
    assert done.status is TaskStatus.CANCELLED
    assert done.error is None
    assert rig.model.cancelled == 1
    types = await rig.types("s_cancel")
    assert types[-1] == "task_cancelled"
    assert types.count("task_cancelled") == 1
    assert "task_complete" not in types
    assert (await rig.events("s_cancel"))[-1].to_dict()["reason"] == "changed my mind"
    assert rig.runner.running_count == 0

    with pytest.raises(Conflict):
        await rig.runner.cancel(ALICE, task.id)


async def test_cancel_during_a_tool_stops_it_and_saves_a_consistent_conversation(rigs: RigFactory) -> None:
    slow = SlowTool()
    rig = rigs([tool_turn(call("slow", {}, "call_1"))], [slow])
    task = await rig.runner.submit(ALICE, "take your time", "s_tool")
    await slow.started.wait()

    await rig.runner.cancel(ALICE, task.id)

    assert (await rig.store.finished(task.id)).status is TaskStatus.CANCELLED
    assert slow.cancelled
    session = await rig.store.get_session("s_tool")
    assert session is not None
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "tool"]
    assert session.messages[3]["tool_call_id"] == "call_1"


async def test_cancel_by_another_subject_is_not_found(rigs: RigFactory) -> None:
    gate = asyncio.Event()
    rig = rigs([Gated(gate, answer("finished anyway"))])
    task = await rig.runner.submit(ALICE, "mine", "s_mine")
    await rig.model.until_parked()

    for stranger in (BOB, ADMIN):
        with pytest.raises(NotFound):
            await rig.runner.cancel(stranger, task.id)
    with pytest.raises(NotFound):
        await rig.runner.cancel(ALICE, "t_missing")

    assert rig.model.cancelled == 0
    gate.set()
    assert (await rig.store.finished(task.id)).status is TaskStatus.COMPLETED


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
async def test_a_task_stopped_before_it_started_is_recorded_and_frees_its_session(rigs: RigFactory, how: str) -> None:
    rig = rigs([answer("later")])
    task = await rig.runner.submit(ALICE, "hello", "s_early")

    if how == "cancel":
        await rig.runner.cancel(ALICE, task.id)
        await rig.runner.cancel_session("s_early", "waiting for it to stop")  # returns once the job is done
        expected = TaskStatus.CANCELLED
    else:
        await rig.runner.shutdown(0)
        expected = TaskStatus.INTERRUPTED

    stored = await rig.store.get_task(task.id)
    assert stored is not None
    assert stored.status is expected
    assert (await rig.types("s_early"))[-1:] == ["task_cancelled"]
    assert rig.runner.running_count == 0


@pytest.mark.parametrize("how", ["cancel", "shutdown"])
async def test_a_stop_while_the_result_is_saved_does_not_lose_it(rigs: RigFactory, how: str) -> None:
    rig = rigs([answer("all done")])
    rig.store.hold_saves()
    task = await rig.runner.submit(ALICE, "hello", "s_saving")
    await rig.store.saving.wait()  # the engine has finished; the runner is storing the result

    if how == "cancel":
        with contextlib.suppress(Conflict):  # too late to cancel: refusing is as good as ignoring it
            await rig.runner.cancel(ALICE, task.id)
        rig.store.release_saves()
        await rig.runner.cancel_session("s_saving", "waiting for it to stop")  # returns once the job is done
    else:
        stopping = asyncio.create_task(rig.runner.shutdown(0))
        await asyncio.sleep(0)
        rig.store.release_saves()
        await stopping

    stored = await rig.store.get_task(task.id)
    assert stored is not None
    assert (stored.status, stored.final_answer) == (TaskStatus.COMPLETED, "all done")
    session = await rig.store.get_session("s_saving")
    assert session is not None
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    assert (await rig.types("s_saving"))[-1] == "task_complete"
    assert rig.runner.running_count == 0


# Shutdown and restart ----------------------------------------------------------------------------------------------


async def test_shutdown_lets_a_quick_task_finish_and_interrupts_a_stuck_one(rigs: RigFactory) -> None:
    quick = asyncio.Event()
    rig = rigs([Gated(quick, answer("made it")), Gated(asyncio.Event())])
    # One at a time: tasks take the model's turns in the order they reach it, which threads may swap.
    fast = await rig.runner.submit(ALICE, "quick", "s_quick")
    await rig.model.until_parked(1)
    stuck = await rig.runner.submit(ALICE, "stuck", "s_stuck")
    await rig.model.until_parked(2)

    # The grace is what the stuck task costs this test. The quick one is released once shutdown waits, and its
    # wake-up is queued before the grace timer can be, so it finishes first however slow the machine is.
    stopping = asyncio.create_task(rig.runner.shutdown(grace_seconds=0.2))
    await asyncio.sleep(0)
    assert rig.runner.draining
    quick.set()
    async with asyncio.timeout(GUARD_SECONDS):
        await stopping

    completed = await rig.store.finished(fast.id)
    assert (completed.status, completed.final_answer) == (TaskStatus.COMPLETED, "made it")
    assert rig.model.cancelled == 1
    interrupted = await rig.store.finished(stuck.id)
    assert interrupted.status is TaskStatus.INTERRUPTED
    assert interrupted.error == INTERRUPTED_BY_SHUTDOWN
    last = (await rig.events("s_stuck"))[-1].to_dict()
    assert (last["event_type"], last["reason"]) == ("task_cancelled", INTERRUPTED_BY_SHUTDOWN)
    assert (await rig.types("s_quick"))[-1] == "task_complete"
    assert rig.runner.running_count == 0


async def test_shutdown_without_grace_interrupts_at_once(rigs: RigFactory) -> None:
    rig = rigs([Gated(asyncio.Event())])
    task = await rig.runner.submit(ALICE, "stuck", "s_stuck")
    await rig.model.until_parked()

    await rig.runner.shutdown(0)

    assert (await rig.store.finished(task.id)).status is TaskStatus.INTERRUPTED
    assert rig.model.cancelled == 1


async def test_no_task_is_taken_once_draining(rigs: RigFactory) -> None:
    rig = rigs([answer()])
    rig.runner.begin_drain()
    assert rig.runner.draining
    with pytest.raises(Unavailable):
        await rig.runner.submit(ALICE, "too late")
    assert await rig.store.list_sessions(None) == []


async def test_recover_marks_unfinished_tasks_interrupted_with_an_error_event(rigs: RigFactory) -> None:
    rig = rigs()
    for session_id, task_id, status in [("s_1", "t_running", TaskStatus.RUNNING),
                                        ("s_2", "t_queued", TaskStatus.QUEUED),
                                        ("s_3", "t_done", TaskStatus.COMPLETED)]:
        await rig.store.create_session(Session(id=session_id, owner="alice"))
        await rig.store.create_task(Task(id=task_id, session_id=session_id, owner="alice", text="x", status=status,
                                         trace_id=TRACE))

    recovered = await rig.runner.recover()

    assert sorted(t.id for t in recovered) == ["t_queued", "t_running"]
    for session_id, task_id in [("s_1", "t_running"), ("s_2", "t_queued")]:
        stored = await rig.store.get_task(task_id)
        assert stored is not None
        assert (stored.status, stored.error) == (TaskStatus.INTERRUPTED, INTERRUPTED_BY_RESTART)
        [event] = [e.to_dict() for e in await rig.events(session_id)]
        assert (event["event_type"], event["task_id"], event["error"], event["recoverable"]) == (
            "error", task_id, INTERRUPTED_BY_RESTART, False)
        assert event["trace_id"] == TRACE
    done = await rig.store.get_task("t_done")
    assert done is not None
    assert done.status is TaskStatus.COMPLETED
    assert await rig.events("s_3") == []
    assert await rig.runner.recover() == []


# The feed: replay, then live ---------------------------------------------------------------------------------------

SESSION = "s_feed"


def thinking(number: int, session_id: str = SESSION) -> Thinking:
    return Thinking(session_id=session_id, task_id="t_feed", delta=str(number))


async def collect(feed: SessionFeed, until_id: int) -> list[int]:
    """The ids the feed delivers, in order, until ``until_id`` (or the feed ends)."""
    seen: list[int] = []
    async with asyncio.timeout(GUARD_SECONDS), contextlib.aclosing(feed.batches()) as batches:
        async for batch in batches:
            seen.extend(event.id for event in batch)
            if seen[-1] >= until_id:
                break
    return seen


async def test_the_feed_replays_then_follows_with_no_gap_or_duplicate() -> None:
    log = MemoryEventLog(MemoryBroker())
    total = 60
    halfway = asyncio.Event()

    async def produce() -> None:
        for number in range(total):
            await log.append(thinking(number))
            if number == total // 3:
                halfway.set()
            await asyncio.sleep(0)  # let the reader run between appends

    producer = asyncio.create_task(produce())
    await halfway.wait()
    feed = SessionFeed(log, SESSION, 0, buffer_size=total)
    seen = await collect(feed, total)
    await producer

    assert seen == list(range(1, total + 1))
    assert feed.replayed >= total // 3
    assert feed.replayed + feed.delivered == total
    assert feed.close_reason == "client_gone"


async def test_an_event_both_replayed_and_live_is_delivered_once() -> None:
    log = MemoryEventLog(MemoryBroker())
    for number in range(2):
        await log.append(thinking(number))
    feed = SessionFeed(log, SESSION, 0, buffer_size=100)  # subscribed from here on
    for number in range(2, 5):
        await log.append(thinking(number))  # now both in the log and pending live

    async with contextlib.aclosing(feed.batches()) as batches:
        replayed = await anext(batches)
        await log.append(thinking(5))
        live = await anext(batches)
        await log.append(thinking(6))
        later = await anext(batches)

    assert [e.id for e in replayed] == [1, 2, 3, 4, 5]
    assert [e.id for e in live] == [6]
    assert [e.id for e in later] == [7]
    assert feed.last_id == 7


async def test_the_feed_resumes_after_the_last_id() -> None:
    log = MemoryEventLog(MemoryBroker())
    for number in range(5):
        await log.append(thinking(number))
        await log.append(thinking(number, "s_other"))
    own = [e.id for e in await log.read_after(SESSION, 0, 100)]

    feed = SessionFeed(log, SESSION, own[1], buffer_size=100)
    seen = await collect(feed, own[-1])

    assert seen == own[2:]


async def test_a_long_replay_is_read_in_pages() -> None:
    log = MemoryEventLog(MemoryBroker())
    total = REPLAY_PAGE * 2 + 7
    for number in range(total):
        await log.append(thinking(number))

    feed = SessionFeed(log, SESSION, 0, buffer_size=10)
    sizes: list[int] = []
    async with contextlib.aclosing(feed.batches()) as batches:
        async for batch in batches:
            sizes.append(len(batch))
            if batch[-1].id == total:
                break

    assert sizes == [REPLAY_PAGE, REPLAY_PAGE, 7]
    assert feed.replayed == total


async def test_a_slow_reader_is_cut_off_after_its_replay() -> None:
    log = MemoryEventLog(MemoryBroker())
    feed = SessionFeed(log, SESSION, 0, buffer_size=2)
    for number in range(5):
        await log.append(thinking(number))  # nobody reads live: the buffer overflows

    seen = await collect(feed, 10**9)

    assert seen == [1, 2, 3, 4, 5]  # the log held what the buffer dropped
    assert feed.close_reason == "slow_client"
    assert feed.dropped == 3


class TurnCounter:
    """Counts the turns of the event loop, to see which turn each event was appended in."""

    def __init__(self) -> None:
        self.turn = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.turn += 1
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._task.cancel()


class TurnLog(MemoryEventLog):
    def __init__(self, turns: TurnCounter) -> None:
        super().__init__(MemoryBroker())
        self.turns = turns
        self.appended_in: list[int] = []

    async def append(self, event: Any) -> StoredEvent:
        self.appended_in.append(self.turns.turn)
        return await super().append(event)


@pytest.mark.parametrize(("burst", "most_in_a_turn"), [(1, 1), (4, 4), (25, 10)])
async def test_a_sink_lets_the_loop_run_once_burst_events_went_in_within_one_turn(burst: int,
                                                                                  most_in_a_turn: int) -> None:
    turns = TurnCounter()
    await asyncio.sleep(0)
    log = TurnLog(turns)
    sink = LogSink(log, burst)
    for number in range(10):
        await sink.emit(thinking(number))
    turns.stop()
    per_turn = [log.appended_in.count(turn) for turn in sorted(set(log.appended_in))]
    assert sum(per_turn) == 10
    assert max(per_turn) == most_in_a_turn
    assert len(per_turn) == -(-10 // most_in_a_turn)  # no turn spent without a reason


async def test_a_turn_the_producer_gives_up_itself_starts_a_new_burst() -> None:
    turns = TurnCounter()
    await asyncio.sleep(0)
    log = TurnLog(turns)
    sink = LogSink(log, 3)
    for number in range(6):
        await sink.emit(thinking(number))
        await asyncio.sleep(0)  # as a model or a tool call would
    turns.stop()
    assert len(set(log.appended_in)) == 6  # one event a turn, and the sink never added a turn of its own


async def test_a_busy_reader_keeps_up_with_a_flood_of_events_from_a_sink() -> None:
    # The reader takes batches (it never writes through): each burst reaches it in the next turn, well inside its
    # buffer, so a flood is not mistaken for a slow client.
    buffer_size = 8
    log = MemoryEventLog(MemoryBroker())
    feed = SessionFeed(log, SESSION, 0, buffer_size=buffer_size)
    reader = asyncio.create_task(collect(feed, 400))
    sink = LogSink(log, emit_burst(buffer_size))
    for number in range(400):
        await sink.emit(thinking(number))
    seen = await reader
    assert seen == list(range(1, 401))
    assert feed.close_reason != "slow_client"
    assert feed.dropped == 0


def test_a_burst_is_a_quarter_of_the_streams_buffer_and_at_least_one() -> None:
    assert [emit_burst(size) for size in (1, 3, 4, 100, 1000)] == [1, 1, 1, 25, 250]
    with pytest.raises(ValueError, match="burst"):
        LogSink(MemoryEventLog(MemoryBroker()), 0)


# Sessions ----------------------------------------------------------------------------------------------------------


async def test_sessions_are_listed_and_read_by_their_owner_and_admins(rigs: RigFactory) -> None:
    rig = rigs([answer("a"), answer("b")])
    sessions = rig.sessions()
    for principal, session_id in [(ALICE, "s_alice"), (BOB, "s_bob")]:
        task = await rig.runner.submit(principal, "hi", session_id)
        await rig.store.finished(task.id)

    assert await sessions.ids(ALICE) == ["s_alice"]
    assert sorted(await sessions.ids(ADMIN)) == ["s_alice", "s_bob"]
    assert (await sessions.get(ADMIN, "s_bob")).owner == "bob"
    assert [e.event_type for e in await sessions.events(ALICE, "s_alice", 0, 100)][-1] == "task_complete"
    for call_ in (sessions.get(ALICE, "s_bob"), sessions.events(ALICE, "s_bob", 0, 100),
                  sessions.get(ALICE, "s_nobody"), sessions.delete(ALICE, "s_bob")):
        with pytest.raises(NotFound):
            await call_


async def test_deleting_a_session_cancels_its_task_and_removes_everything(rigs: RigFactory) -> None:
    rig = rigs([Gated(asyncio.Event())])
    sessions = rig.sessions()
    task = await rig.runner.submit(ALICE, "forever", "s_doomed")
    await rig.model.until_parked()

    await sessions.delete(ALICE, "s_doomed")

    assert rig.model.cancelled == 1
    assert rig.runner.running_count == 0
    assert await rig.store.get_session("s_doomed") is None
    assert await rig.store.get_task(task.id) is None
    assert await rig.events("s_doomed") == []
    assert not (rig.workspaces.root / "s_doomed").exists()


async def test_following_claims_a_free_id_and_counts_against_the_stream_cap(rigs: RigFactory) -> None:
    rig = rigs()
    sessions = rig.sessions(max_streams_per_client=2)

    first = await sessions.follow(ALICE, "s_early", 0)
    second = await sessions.follow(ALICE, "s_early", 0)
    with pytest.raises(LimitExceeded):
        await sessions.follow(ALICE, "s_early", 0)
    with pytest.raises(NotFound):
        await sessions.follow(BOB, "s_early", 0)  # alice claimed it by following first

    sessions.unfollow(ALICE, first)
    sessions.unfollow(ALICE, first)  # safe twice: frees one place only
    third = await sessions.follow(ALICE, "s_early", 0)
    with pytest.raises(LimitExceeded):
        await sessions.follow(ALICE, "s_early", 0)
    for feed in (second, third):
        sessions.unfollow(ALICE, feed)
    assert sessions.streams.total == 0
    assert rig.broker.subscriber_count() == 0
