"""The plain baseline: FastAPI and sse-starlette with one ``asyncio.Queue`` per client, as this design is usually
written. Each event is put in every queue of its session; each stream's generator takes one event at a time and
yields it for sse-starlette to encode (per client) and send, with its default ping, send and disconnect tasks.
Under uvicorn with uvloop and httptools, as the service.

Run: ``python -m loadtests.servers.hub`` (see :mod:`loadtests.servers.control` for its stdin commands).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
import uvloop
from fastapi import FastAPI, Request
from sse_starlette import EventSourceResponse

from loadtests.servers.control import envelope, serve


class Hub:
    def __init__(self) -> None:
        self.queues: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self.next_id = 1

    def publish(self, session_id: str, chunk: str) -> None:
        event = envelope(self.next_id, session_id, chunk)
        self.next_id += 1
        for queue in self.queues.get(session_id, ()):
            queue.put_nowait(event)


def build_app(hub: Hub, ping: float) -> FastAPI:
    app = FastAPI()

    @app.get("/api/sse")
    async def stream(request: Request, session_id: str) -> EventSourceResponse:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        hub.queues.setdefault(session_id, set()).add(queue)

        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                yield {"event": "connected", "data": json.dumps({"session_id": session_id})}
                while True:
                    event = await queue.get()
                    yield {"id": event["id"], "event": event["event_type"], "data": json.dumps(event)}
            finally:
                hub.queues[session_id].discard(queue)

        return EventSourceResponse(events(), ping=ping)

    return app


async def main(ping: float) -> None:
    hub = Hub()
    config = uvicorn.Config(build_app(hub, ping), host="127.0.0.1", port=0, loop="uvloop", http="httptools",
                            lifespan="off", access_log=False, log_level="warning", backlog=4096)
    server = uvicorn.Server(config)

    async def emit(session_id: str, seq: int, chunk: str) -> None:
        hub.publish(session_id, chunk)
        await asyncio.sleep(0)

    await serve(server, emit)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m loadtests.servers.hub")
    parser.add_argument("--ping", type=float, default=15.0, help="sse-starlette's ping interval (default 15 s)")
    uvloop.run(main(parser.parse_args().ping))
