"""Submit, inspect and cancel tasks."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import SessionReader, TaskSubmitter, TaskWriter, container_of
from service.api.problems import problem_responses
from service.api.schemas import TaskAccepted, TaskCreate, TaskView

router = APIRouter(prefix="/api/tasks", tags=["tasks"])

_PROBLEMS = problem_responses(404)


@router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    responses=problem_responses(400, 404, 409, 413, 415, 503),
)
async def submit_task(body: TaskCreate, request: Request, principal: TaskSubmitter) -> JSONResponse:
    """Start a task in a session (new or existing); it runs in the background. Follow it on ``/api/sse``."""
    task = await container_of(request).runner.submit(principal, body.task, body.session_id)
    structlog.contextvars.bind_contextvars(session_id=task.session_id, task_id=task.id)
    accepted = TaskAccepted(
        session_id=task.session_id,
        task_id=task.id,
        message="Task is being executed. Connect to the SSE endpoint to receive events.",
    )
    return JSONResponse(accepted.model_dump(), status_code=202,
                        headers={"Location": f"/api/tasks/{task.id}"})


@router.get("/{task_id}", response_model=TaskView, responses=_PROBLEMS)
async def get_task(task_id: str, request: Request, principal: SessionReader) -> TaskView:
    """The task's status and, once finished, its answer, iterations, usage and error."""
    task = await container_of(request).runner.get(principal, task_id)
    return TaskView.model_validate(task.to_dict())


@router.post("/{task_id}/cancel", status_code=202, response_model=TaskView, responses=problem_responses(404, 409))
async def cancel_task(task_id: str, request: Request, principal: TaskWriter) -> TaskView:
    """Stop a queued or running task (idempotent). A finished task answers 409."""
    task = await container_of(request).runner.cancel(principal, task_id)
    return TaskView.model_validate(task.to_dict())
