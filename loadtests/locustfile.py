"""Load tests of a running alex-server deployment with Locust: streams, tasks and sessions, with tokens.

    .venv/bin/locust -f loadtests/locustfile.py --config loadtests/locust/smoke.conf --host https://alex.example \\
        --alex-secret "$ALEX_JWT_SECRET"

Two kinds of users, each with its own token subject (minted from ``--alex-secret``, the deployment's HS256 key,
or one shared ``--alex-token``):

- ``StreamUser`` keeps a stream open on its own session, submits a task there and follows it to its end. Now and
  then (``--alex-reconnect``) it drops the stream half-way and resumes it with ``Last-Event-ID``. Once the task
  ended it compares what it received with the session's stored events. Custom entries in Locust's statistics
  (request type ``SSE``): ``time to first event`` (from the task's ``POST`` to its first event on the stream),
  ``delivery latency`` (an event's ``timestamp`` to its arrival: the two clocks must agree, so this is meaningful
  when the load generator runs in or next to the cluster, synchronised by NTP), ``reconnect`` (a resume; its time
  is the time to the ``connected`` frame). A ``gap`` (a stored event the stream never delivered) or a
  ``duplicate`` is reported as a failure, so a run with none is a run with no failure at all.
- ``TaskUser`` submits tasks, polls them to their end and reads the sessions API (list, one session, its events).

Profiles (``loadtests/locust/*.conf``): ``smoke`` (a few users for a few seconds: what CI runs, checking no
failure and no gap, never timings) and ``soak`` (hundreds of users for an hour). The run exits with 1 when there
was any failure, gap or duplicate. The target's rate limits must let each user submit its tasks
(``ALEX_RATE_LIMIT_TASKS``, 10 a minute per subject by default): each user is one subject.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment
from requests import Response

from service.tokens import mint_token

SCOPES = ["tasks:write", "sessions:read", "sessions:write"]
TERMINAL = frozenset({"task_complete", "task_cancelled", "error"})
STREAM_TIMEOUT = 120.0
TALLY = {"gaps": 0, "duplicates": 0, "reconnects": 0, "tasks": 0}
"""Totals over every user of this process, printed (and checked) when the run ends."""


def _options(parser: Any) -> None:
    parser.add_argument("--alex-secret", default="", env_var="ALEX_JWT_SECRET", is_secret=True,
                       help="the deployment's HS256 secret: each user mints a token for a subject of its own")
    parser.add_argument("--alex-token", default="", env_var="ALEX_TOKEN", is_secret=True,
                       help="one token every user shares (when the deployment's keys are not at hand)")
    parser.add_argument("--alex-task", default="Look around.", help="the task each user submits")
    parser.add_argument("--alex-reconnect", type=float, default=0.3,
                       help="share of streamed tasks whose stream is dropped half-way and resumed (default 0.3)")


def _verdict(environment: Environment, **_: Any) -> None:
    print(f"alex-server: {TALLY['tasks']} streamed tasks, {TALLY['reconnects']} reconnects, {TALLY['gaps']} gaps, "
          f"{TALLY['duplicates']} duplicates")
    if TALLY["gaps"] or TALLY["duplicates"] or environment.stats.total.num_failures:
        environment.process_exit_code = 1


events.init_command_line_parser.add_listener(_options)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_verdict)  # type: ignore[no-untyped-call]


def _record(environment: Environment, name: str, milliseconds: float, error: Exception | None = None) -> None:
    environment.events.request.fire(  # type: ignore[no-untyped-call]
        request_type="SSE", name=name, response_time=milliseconds, response_length=0, exception=error, context={})


class SessionGap(Exception):
    """A stored event of the session never reached the stream (or reached it twice)."""


class _AlexUser(HttpUser):
    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.subject = f"locust-{uuid.uuid4().hex[:12]}"
        token = getattr(options, "alex_token", "") if options is not None else ""
        secret = getattr(options, "alex_secret", "") if options is not None else ""
        if not token and secret:
            token = mint_token(secret, self.subject, SCOPES, 24 * 3600)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.task_text = getattr(options, "alex_task", "Look around.") if options is not None else "Look around."

    def submit(self, session_id: str) -> str | None:
        with self.client.post("/api/tasks", json={"task": self.task_text, "session_id": session_id},
                              headers=self.headers, name="/api/tasks", catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return None
            task_id: str = response.json()["task_id"]
            return task_id


@dataclass
class _Run:
    """One streamed task: its session, what the streams received, where to resume."""

    session_id: str
    drop_after: int | None
    task_id: str | None = None
    submitted: float = 0.0
    last_id: str | None = None
    received: list[str] = field(default_factory=list)


class StreamUser(_AlexUser):
    """Follows its own session on a stream while its tasks run; resumes now and then; checks for gaps."""

    weight = 3
    wait_time = between(1, 3)

    @task
    def streamed_task(self) -> None:
        options = self.environment.parsed_options
        share = getattr(options, "alex_reconnect", 0.3) if options is not None else 0.3
        # Load shaping, not secrets.
        drop_after = random.randint(2, 6) if random.random() < share else None  # noqa: S311
        run = _Run(f"locust-{uuid.uuid4().hex[:16]}", drop_after)
        while True:
            started = time.monotonic()
            headers = {**self.headers, "Accept": "text/event-stream"}
            if run.last_id is not None:
                headers["Last-Event-ID"] = run.last_id
            with self.client.get("/api/sse", params={"session_id": run.session_id}, headers=headers, stream=True,
                                 name="/api/sse", catch_response=True, timeout=(10, STREAM_TIMEOUT)) as response:
                if response.status_code != 200:
                    response.failure(f"{response.status_code}: {response.text[:200]}")
                    return
                response.success()
                ended = self._follow(response, run, started)
            if ended or run.task_id is None:
                break
            run.drop_after = None
            TALLY["reconnects"] += 1
        if run.task_id is not None:
            TALLY["tasks"] += 1
            self._check(run.session_id, run.received)

    def _follow(self, response: Response, run: _Run, started: float) -> bool:
        """Read one stream until the task's end (True) or a deliberate drop (False)."""
        first_seen = run.task_id is not None
        resumed = run.last_id is not None
        event, data = "", ""
        for raw in response.iter_lines(decode_unicode=True):
            line = raw.decode() if isinstance(raw, bytes) else raw or ""
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            if line != "" or not data:
                continue
            body, kind = json.loads(data), event
            event, data = "", ""
            if kind == "connected":
                if run.task_id is not None:
                    _record(self.environment, "reconnect", (time.monotonic() - started) * 1000)
                    continue
                run.submitted = time.monotonic()
                run.task_id = self.submit(run.session_id)
                if run.task_id is None:
                    return True
                continue
            run.received.append(body["id"])
            run.last_id = body["id"]
            arrived = time.time()
            if not first_seen and body.get("task_id") == run.task_id:
                first_seen = True
                _record(self.environment, "time to first event", (time.monotonic() - run.submitted) * 1000)
            if not resumed:  # a resumed stream starts with stored events: their age is not delivery latency
                stamp = datetime.fromisoformat(body["timestamp"]).timestamp()
                _record(self.environment, "delivery latency", max(0.0, arrived - stamp) * 1000)
            if body.get("task_id") == run.task_id and kind in TERMINAL:
                return True
            if run.drop_after is not None and len(run.received) >= run.drop_after:
                return False
        return False

    def _check(self, session_id: str, received: list[str]) -> None:
        stored: list[str] = []
        after: str | None = "0"
        while after is not None:
            response = self.client.get(f"/api/sessions/{session_id}/events", params={"after": after, "limit": 500},
                                       headers=self.headers, name="/api/sessions/{id}/events")
            if response.status_code != 200:
                return
            page = response.json()
            stored.extend(str(e["id"]) for e in page["events"])
            after = page["next_after"]
        seen = set(received)
        missing = [event_id for event_id in stored if event_id not in seen]
        repeated = len(received) - len(seen)
        TALLY["gaps"] += len(missing)
        TALLY["duplicates"] += repeated
        if missing or repeated:
            _record(self.environment, "gap", 0.0, SessionGap(f"session {session_id}: {len(missing)} missing, "
                                                           f"{repeated} repeated"))


class TaskUser(_AlexUser):
    """Submits tasks without a stream, polls them to their end, and reads the sessions API."""

    weight = 1
    wait_time = between(1, 3)

    @task
    def polled_task(self) -> None:
        session_id = f"locust-{uuid.uuid4().hex[:16]}"
        task_id = self.submit(session_id)
        if task_id is None:
            return
        deadline = time.monotonic() + STREAM_TIMEOUT
        while time.monotonic() < deadline:
            with self.client.get(f"/api/tasks/{task_id}", headers=self.headers, name="/api/tasks/{id}",
                                 catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"{response.status_code}: {response.text[:200]}")
                    return
                if response.json()["status"] not in ("queued", "running"):
                    break
            time.sleep(0.25)
        self.client.get("/api/sessions", headers=self.headers, name="/api/sessions")
        self.client.get(f"/api/sessions/{session_id}", headers=self.headers, name="/api/sessions/{id}")
        self.client.get(f"/api/sessions/{session_id}/events", params={"after": "0", "limit": 100},
                        headers=self.headers, name="/api/sessions/{id}/events")
