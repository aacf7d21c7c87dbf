"""Submit, inspect and cancel tasks."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from service.api.deps import DEFAULT_LIMIT, TASKS_LIMIT, RunnerDep, SessionReader, TaskWriter
from service.api.problems import ApiError, problem_responses
from service.api.schemas import TaskAccepted, TaskCreate, TaskView

router = APIRouter(prefix="/api/tasks", tags=["tasks"])

_PROBLEMS = problem_responses(404)


async def require_json(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "the request body must be application/json")


@router.post(
    "",
    status_code=202,
    response_model=TaskAccepted,
    dependencies=[TASKS_LIMIT, Depends(require_json)],
    responses=problem_responses(400, 404, 409, 413, 415, 503),
)
async def submit_task(body: TaskCreate, principal: TaskWriter, runner: RunnerDep) -> JSONResponse:
    """Start a task in a session (new or existing); it runs in the background. Follow it on ``/api/sse``."""
    task = await runner.submit(principal, body.task, body.session_id)
    structlog.contextvars.bind_contextvars(session_id=task.session_id, task_id=task.id)
    accepted = TaskAccepted(
        session_id=task.session_id,
        task_id=task.id,
        message="Task is being executed. Connect to the SSE endpoint to receive events.",
    )
    return JSONResponse(accepted.model_dump(), status_code=202,
                        headers={"Location": f"/api/tasks/{task.id}"})


@router.get("/{task_id}", response_model=TaskView, responses=_PROBLEMS, dependencies=[DEFAULT_LIMIT])
async def get_task(task_id: str, principal: SessionReader, runner: RunnerDep) -> TaskView:
    """The task's status and, once finished, its answer, iterations, usage and error."""
    task = await runner.get(principal, task_id)
    return TaskView.model_validate(task.to_dict())


@router.post("/{task_id}/cancel", status_code=202, response_model=TaskView, dependencies=[DEFAULT_LIMIT],
             responses=problem_responses(404, 409))
async def cancel_task(task_id: str, principal: TaskWriter, runner: RunnerDep) -> TaskView:
    """Stop a queued or running task (idempotent). A finished task answers 409."""
    task = await runner.cancel(principal, task_id)
    return TaskView.model_validate(task.to_dict())
