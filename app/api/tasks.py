"""`/tasks`: enqueue, read, list, and the attempt history."""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from app.api.deps import DurableTasks, Service
from app.api.schemas import AttemptOut, StatsOut, TaskIn, TaskOut, TaskPageOut, answers
from store import attempts as store_attempts
from store import control
from store import stats as store_stats
from store import tasks as store_tasks
from store.models import TaskStatus

MAX_WAIT = 60.0
# How often a waiting request re-reads a task that another process may finish; tasks this
# process finishes wake it at once.
WAIT_POLL = 0.25


async def create_task(
    body: TaskIn,
    tasks: DurableTasks,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> TaskOut:
    """Enqueue a registered task; the row is committed before this answers (202).

    With an `Idempotency-Key` header, the same key and body again answer 200 with the first
    task and store nothing; the same key with another body is refused with 422.
    """
    new, now = tasks.prepare(
        body.name,
        body.args,
        body.kwargs,
        body.delay,
        body.run_at,
        body.queue,
        body.priority,
        body.max_attempts,
        idempotency_key,
    )
    existing = await tasks.store_async(new, now)
    task = TaskOut.queued(new, now) if existing is None else TaskOut.of(existing)
    # The path this was posted to, under whatever prefix the app mounted the router at.
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{task.id}"
    if existing is not None:
        response.status_code = status.HTTP_200_OK
    return task


def task_stats(service: Service) -> StatsOut:
    """Counts per state and per queue, and how long the oldest due task has waited."""
    with service.db.read() as conn:
        stats = store_stats.task_stats(conn)
    return StatsOut(
        counts=stats.counts,
        queues=stats.queues,
        oldest_due_seconds=stats.oldest_due_seconds,
    )


def list_tasks(
    service: Service,
    status: TaskStatus | None = None,
    name: str | None = None,
    queue: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> TaskPageOut:
    """List tasks newest first, filtered by state, name and queue, a page at a time."""
    with service.db.read() as conn:
        page = store_tasks.list_tasks(
            conn, status=status, name=name, queue=queue, limit=limit, cursor=cursor
        )
    return TaskPageOut(
        items=[TaskOut.of(task) for task in page.items], next_cursor=page.next_cursor
    )


async def get_task(
    task_id: str,
    service: Service,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
) -> TaskOut:
    """Read a task; with `?wait=S`, answer once it is terminal or S seconds have passed."""

    def read() -> TaskOut:
        with service.db.read() as conn:
            return TaskOut.of(store_tasks.get_task(conn, task_id))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        task = await run_in_threadpool(read)
        remaining = deadline - loop.time()
        if task.status.terminal or remaining <= 0:
            return task
        await service.finished.wait(min(remaining, WAIT_POLL))


def cancel_task(task_id: str, service: Service) -> TaskOut:
    """Cancel a task: queued or retrying at once; running when its function stops; 409 if
    it already finished."""
    with service.db.write() as conn:
        task = control.cancel_task(conn, task_id)
    if task.status == TaskStatus.RUNNING:
        service.runner.cancel_local(task.id)  # counted by the runner when it stops
    else:
        service.metrics.cancelled(task.name, task.queue)
    return TaskOut.of(task)


def retry_task(task_id: str, service: Service) -> TaskOut:
    """Queue a failed or cancelled task again with a fresh attempt budget (history kept);
    409 in any other state."""
    with service.db.write() as conn:
        task = control.retry_task(conn, task_id)
    service.runner.notify()
    return TaskOut.of(task)


def list_attempts(task_id: str, service: Service) -> list[AttemptOut]:
    """Every attempt at a task, oldest first, with its outcome, error and traceback."""
    with service.db.read() as conn:
        attempts = store_attempts.list_attempts(conn, task_id)
    return [AttemptOut.of(attempt) for attempt in attempts]


def add_routes(router: APIRouter) -> None:
    """Add the `/tasks` routes to `router` (the literal `/tasks/stats` before `/tasks/{id}`),
    each with the refusals it can answer (the router adds those every route shares)."""
    tags: list[str | Enum] = ["tasks"]
    router.add_api_route(
        "/tasks",
        create_task,
        methods=["POST"],
        status_code=status.HTTP_202_ACCEPTED,
        response_model=TaskOut,
        responses={
            200: {"model": TaskOut, "description": "Same Idempotency-Key and body again"},
            **answers(422),
        },
        tags=tags,
    )
    router.add_api_route("/tasks/stats", task_stats, methods=["GET"], tags=tags)
    router.add_api_route("/tasks", list_tasks, methods=["GET"], responses=answers(422), tags=tags)
    router.add_api_route(
        "/tasks/{task_id}", get_task, methods=["GET"], responses=answers(404, 422), tags=tags
    )
    for path, endpoint in [("cancel", cancel_task), ("retry", retry_task)]:
        router.add_api_route(
            f"/tasks/{{task_id}}/{path}",
            endpoint,
            methods=["POST"],
            responses=answers(404, 409, 422),
            tags=tags,
        )
    router.add_api_route(
        "/tasks/{task_id}/attempts",
        list_attempts,
        methods=["GET"],
        responses=answers(404, 422),
        tags=tags,
    )
