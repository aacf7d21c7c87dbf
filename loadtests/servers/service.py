"""The service itself, as ``alex-server serve`` runs it, with a synthetic producer in the same process.

The application, its settings (from the environment), its middleware, auth, rate limits, metrics and uvicorn's
configuration are exactly those of ``alex-server serve``. Only the producer is the benchmark's: instead of agent
tasks, one asyncio task per session emits ``tool_call_stream`` events through the engine's own sink
(:class:`~service.app.stream.LogSink`) into ``container.events``, so every event takes the real way: the log gives
it its id, encodes it once, queues its row for SQLite and publishes it to the broker, whose subscriptions feed the
authenticated ``/api/sse`` streams.

Run: ``python -m loadtests.servers.service`` with the ``ALEX_*`` environment (see :mod:`loadtests.servers.control`
for its stdin commands).
"""

from __future__ import annotations

import argparse

import uvloop

from loadtests.servers.control import TASK_ID, TRACE_ID, serve
from service.app.stream import LogSink
from service.cli import HAND_OFF_STREAMS, DrainingServer, prepare_process, server_config
from service.config import load_settings
from service.container import Container
from service.domain.events import ToolCallStream
from service.main import create_app
from service.observability.logging import configure_logging


async def main(hand_off: bool) -> None:
    settings = load_settings()
    prepare_process()
    configure_logging(settings.resolved_log_format, settings.log_level)
    app = create_app(settings)
    server = DrainingServer(server_config(app, settings, hand_off_streams=hand_off))
    sink: LogSink | None = None

    async def emit(session_id: str, seq: int, chunk: str) -> None:
        nonlocal sink
        if sink is None:
            container: Container = app.state.container
            sink = LogSink(container.events)
        await sink.emit(ToolCallStream(session_id=session_id, task_id=TASK_ID, trace_id=TRACE_ID, iteration=1,
                                       tool_name="bash", call_id="call_1_0", chunk=chunk))

    await serve(server, emit)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m loadtests.servers.service")
    parser.add_argument("--hand-off", choices=("on", "off", "default"), default="default",
                        help="streams leave the framework once open (default: as alex-server serve does)")
    choice = parser.parse_args().hand_off
    uvloop.run(main(HAND_OFF_STREAMS if choice == "default" else choice == "on"))
