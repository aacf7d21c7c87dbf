"""The web UI's stream (``/ui/sse``) over real sockets: a second rendering of ``/api/sse`` with the same ids and
resume, escaped, and ended by a last frame without an id when the server ends it (a deleted session, a draining
server, a page that fell behind)."""

from __future__ import annotations

import json
import signal
import socket
import threading
from collections.abc import Iterator

import pytest

from service.web.render import EVENT_TEMPLATES
from tests.integration.calls import STREAM_TIMEOUT
from tests.integration.server import ServerProcess, running, token
from tests.integration.ui_calls import (
    api,
    browser,
    new_session,
    parse_frames,
    read_frames,
    run_to_end,
    stream,
    terminal,
    terminals,
)

pytestmark = pytest.mark.integration

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running() as process:
        yield process


def delete_later(server: ServerProcess, session_id: str, delay: float) -> threading.Timer:
    def delete() -> None:
        with browser(server) as client:
            assert client.delete(f"/ui/sessions/{session_id}").status_code == 200

    timer = threading.Timer(delay, delete)
    timer.start()
    return timer


def test_fragments_show_hostile_event_text_as_text(server: ServerProcess) -> None:
    with browser(server) as client, api(server) as alice:
        session_id = new_session(client)
        run_to_end(alice, session_id, HOSTILE)
        frames = stream(client, "/ui/sse", session_id, terminal)
    html = "\n".join(frame.data for frame in frames[1:])
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in html
    assert "<script" not in html
    assert "<img" not in html
    assert "onerror=\"" not in html
    assert all(frame.id is not None for frame in frames[1:]), "every event frame carries its id"
    assert {frame.event for frame in frames[1:]} <= set(EVENT_TEMPLATES)


def test_the_ui_stream_is_the_api_stream_rendered_with_the_same_ids_and_resume(server: ServerProcess) -> None:
    with browser(server) as client, api(server) as alice:
        session_id = new_session(client)
        first = run_to_end(alice, session_id, "$ echo one; echo two")
        second = run_to_end(alice, session_id, "$ printf 'three\\n'")
        api_frames = stream(alice, "/api/sse", session_id, terminals(2))[1:]
        assert json.loads(api_frames[-1].data)["task_id"] == second
        ui_frames = stream(client, "/ui/sse", session_id, terminals(2))
        assert ui_frames[0].event == "connected"
        ui_frames = ui_frames[1:]
        assert [(f.id, f.event) for f in ui_frames] == [(f.id, f.event) for f in api_frames]
        assert ui_frames[0].data.count("<article") == 1
        assert sum(f.data.count("<article") for f in ui_frames) == 2, "one article per task"
        assert first in ui_frames[0].data

        # Resume in the middle of the first task, by header and by query: the same ids as /api/sse after it.
        middle = api_frames[len(api_frames) // 3].id
        assert middle is not None
        api_rest = stream(alice, "/api/sse", session_id, terminals(2), headers={"Last-Event-ID": middle})[1:]
        for how in ({"headers": {"Last-Event-ID": middle}}, {"params": {"last_event_id": middle}}):
            resumed = stream(client, "/ui/sse", session_id, terminals(2), **how)
            notice, rest = resumed[1], resumed[2:]
            assert (notice.event, notice.id) == ("notice", None)
            assert f"resumed after event {middle}" in notice.data
            assert [(f.id, f.event) for f in rest] == [(f.id, f.event) for f in api_rest]
            # The page holds the first task's article already: only the second task opens one.
            articles = [f for f in rest if "<article" in f.data]
            assert len(articles) == 1
            assert second in articles[0].data


def test_a_deleted_session_ends_the_ui_stream_with_a_closing_frame(server: ServerProcess) -> None:
    with browser(server) as client:
        session_id = new_session(client)
        with client.stream("GET", "/ui/sse", params={"session_id": session_id}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines) == "retry: 1000"
            deleter = delete_later(server, session_id, 0.3)
            try:
                frames = read_frames(lines, lambda frame: frame.event == "closed")
            finally:
                deleter.join()
    assert frames[-1].id is None
    assert "This session was deleted." in frames[-1].data


def test_a_draining_server_ends_the_ui_stream_with_a_notice_without_an_id() -> None:
    with running() as server, browser(server) as client:
        session_id = new_session(client)
        with client.stream("GET", "/ui/sse", params={"session_id": session_id}) as response:
            assert response.status_code == 200
            stopper = threading.Timer(0.3, server.stop, kwargs={"sig": signal.SIGTERM})
            stopper.start()
            try:
                frames = read_frames(response.iter_lines(), lambda frame: frame.event == "notice")
            finally:
                stopper.join()
    assert frames[-1].id is None
    assert 'data-kind="draining"' in frames[-1].data


# A page that falls behind


def dechunk(body: bytes) -> bytes:
    """The data of a whole chunked body."""
    out = bytearray()
    position = 0
    while True:
        end = body.index(b"\r\n", position)
        size = int(body[position:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        position = end + 2 + size + 2


def test_a_page_that_falls_behind_gets_a_notice_then_resumes_without_a_gap() -> None:
    """A page that stops reading while a task pours out output is cut off as slow: its stream's last frame is a
    notice without an id, and reconnecting after the last whole event brings the rest, as /api/sse would."""
    command = "for i in $(seq 200); do head -c 60000 /dev/zero | tr '\\0' x; echo; done"
    # A long heartbeat: the write that the stalled page blocks must not time out before the page reads again.
    with running(ALEX_SSE_BUFFER_SIZE="5", ALEX_MOCK_DELAY_MS="1", ALEX_TOOL_OUTPUT_LIMIT_BYTES="50000000",
                 ALEX_SSE_HEARTBEAT_SECONDS="30") as server, browser(server) as client, api(server) as alice:
        assert server.port is not None
        session_id = new_session(client)
        request = "\r\n".join([f"GET /ui/sse?session_id={session_id} HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
                               f"Cookie: alex_token={token()}", "Accept: text/event-stream", "", ""])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(STREAM_TIMEOUT)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(request.encode())
            received = bytearray()
            while b"event: connected" not in received:
                received += sock.recv(512)
            task_id = run_to_end(alice, session_id, f"$ {command}")  # the page reads nothing meanwhile
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = sock.recv(1 << 20)
                assert chunk, "the server closed the connection without ending the stream"
                received += chunk
        _, _, body = bytes(received).partition(b"\r\n\r\n")
        frames = list(parse_frames(dechunk(body).decode().split("\n")))
        notice = frames[-1]
        assert (notice.event, notice.id) == ("notice", None)
        assert 'data-kind="slow_client"' in notice.data
        events = [frame for frame in frames if frame.id is not None]
        assert events
        assert all(frame.event != "task_complete" for frame in events), "the page was never slow"
        last = events[-1].id
        assert last is not None
        rest = stream(client, "/ui/sse", session_id, terminal, headers={"Last-Event-ID": last})[2:]
        stored = alice.get(f"/api/sessions/{session_id}/events", params={"after": last, "limit": 1000}).json()
        assert [frame.id for frame in rest] == [event["id"] for event in stored["events"]]
        assert stored["events"][-1]["task_id"] == task_id
        assert rest[-1].event == "task_complete"
