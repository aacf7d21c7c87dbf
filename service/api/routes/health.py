"""Liveness and readiness: never authenticated, never rate-limited."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import ContainerDep
from service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """200 while the process lives."""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health}})
async def ready(container: ContainerDep) -> JSONResponse:
    """200 when the store answers and the server takes work; 503 while starting or draining."""
    if not container.ready:
        return JSONResponse({"status": "draining" if container.runner.draining else "starting"}, status_code=503)
    try:
        await container.store.ping()
    except Exception:
        return JSONResponse({"status": "store unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})
