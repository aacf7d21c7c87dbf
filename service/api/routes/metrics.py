"""``GET /metrics`` (``ALEX_METRICS_PATH``): the Prometheus exposition of :mod:`service.observability.metrics`.

No token and no rate limit, like the health checks: the scraper is infrastructure, and nothing here names a user,
a session or a task (labels are bounded). Keep the port inside the cluster (docs/operations.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import Response
from prometheus_client.exposition import choose_encoder

from service.api.deps import ContainerDep


def metrics_router(path: str) -> APIRouter:
    router = APIRouter(tags=["health"])
    router.add_api_route(path, metrics, methods=["GET"], include_in_schema=False)
    return router


async def metrics(container: ContainerDep, accept: Annotated[str | None, Header()] = None) -> Response:
    encode, content_type = choose_encoder(accept or "")
    return Response(encode(container.metrics.registry), media_type=content_type)
