"""`/tasks`: enqueue, read, list, and the attempt history."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.api.deps import DurableTasks, Service
from app.api.events import STREAM_ANSWER, task_events
from app.api.schemas import AttemptOut, StatsOut, TaskIn, TaskOut, TaskPageOut, answers
from store import attempts as store_attempts
from store import ratelimits
from store import stats as store_stats
from store import tasks as store_tasks
from store.models import TaskStatus

MAX_WAIT = 60.0


async def create_task(
    body: TaskIn,
    tasks: DurableTasks,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> TaskOut:
    """Enqueue a registered task; the row is committed before this answers (202).

    With an `Idempotency-Key` header, the same key and body again answer 200 with the first
    task and store nothing; the same key with another body is refused with 422. With a
    `unique_key`, while a task with that key is queued, running or retrying, the answer is
    200 with that task, and nothing is stored. With `after`, the task waits until each named
    task has succeeded (`waiting_on` counts those left), and is cancelled when one fails or
    is cancelled; an unknown id is refused (422).
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
        unique_key=body.unique_key,
        after=body.after,
    )
    existing = await tasks.store_async(new, now)
    if existing is not None:
        task = TaskOut.of(existing)
    elif new.after:
        # It may wait on its parents, or be stored cancelled already (a parent failed).
        task = await run_in_threadpool(lambda: TaskOut.of(tasks.get(new.id)))
    else:
        task = TaskOut.queued(new, now)
    # The path this was posted to, under whatever prefix the app mounted the router at.
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{task.id}"
    if existing is not None:
        response.status_code = status.HTTP_200_OK
    return task


def task_stats(service: Service) -> StatsOut:
    """Counts per state and per queue, how long the oldest due task has waited, and the
    rate-limited queues' use of their limits."""
    with service.db.read() as conn:
        stats = store_stats.task_stats(conn)
        use = ratelimits.queue_use(conn, service.settings.rate_limits)
    return StatsOut.of(stats, use)


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
    tasks: DurableTasks,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
) -> TaskOut:
    """Read a task; with `?wait=S`, answer once it is terminal or S seconds have passed."""
    # (Shown on a worker thread, as every read is: a row nested deep takes a deep stack.)
    if wait == 0:
        return await run_in_threadpool(lambda: TaskOut.of(tasks.get(task_id)))
    # Answers the moment the task ends, in whichever process: the watcher hears it.
    return await run_in_threadpool(TaskOut.of, await tasks.finished_async(task_id, wait))


def cancel_task(task_id: str, tasks: DurableTasks) -> TaskOut:
    """Cancel a task: queued or retrying at once; running when its function stops; 409 if
    it already finished."""
    return TaskOut.of(tasks.cancel(task_id))


def retry_task(task_id: str, tasks: DurableTasks) -> TaskOut:
    """Queue a failed or cancelled task again with a fresh attempt budget (history kept);
    409 in any other state, or while another active task holds its unique key."""
    return TaskOut.of(tasks.retry(task_id))


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
            200: {
                "model": TaskOut,
                "description": "The task that holds the key: the same Idempotency-Key and body"
                " again, or the active task with this unique_key; nothing stored",
            },
            **answers(422, 503),
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
            responses=answers(404, 409, 422, 503),
            tags=tags,
        )
    router.add_api_route(
        "/tasks/{task_id}/events",
        task_events,
        methods=["GET"],
        response_class=StreamingResponse,
        responses={**STREAM_ANSWER, **answers(404, 422)},
        tags=tags,
    )
    router.add_api_route(
        "/tasks/{task_id}/attempts",
        list_attempts,
        methods=["GET"],
        responses=answers(404, 422),
        tags=tags,
    )
