"""One replica for :mod:`loadtests.replicas`: the application ``alex-server serve`` builds, on the settings of its
environment (``ALEX_REDIS_URL`` or not), under uvicorn, with the benchmark producer of
:mod:`loadtests.servers.control` writing ``tool_call_stream`` events through the engine's sink into the event log.

Run: ``python -m loadtests.servers.replica`` with the ``ALEX_*`` environment.
"""

from __future__ import annotations

import uvicorn
import uvloop

from loadtests.servers.control import TASK_ID, TRACE_ID, serve
from service.app.stream import LogSink
from service.config import load_settings
from service.domain.events import ToolCallStream
from service.main import create_app
from service.observability.logging import configure_logging


async def main() -> None:
    settings = load_settings()
    configure_logging(settings.resolved_log_format, settings.log_level)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on",
                                           log_config=None, access_log=False, server_header=False))

    async def emit(session_id: str, seq: int, chunk: str) -> None:
        await LogSink(app.state.container.events).emit(ToolCallStream(
            session_id=session_id, task_id=TASK_ID, trace_id=TRACE_ID, iteration=1, tool_name="bash",
            call_id="call_1_0", chunk=chunk))

    await serve(server, emit)


if __name__ == "__main__":
    uvloop.run(main())
