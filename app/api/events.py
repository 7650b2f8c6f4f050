"""`GET /tasks/{id}/events`: a task's changes as Server-Sent Events, until it ends.

Each event's `data` is the task as `GET /tasks/{id}` shows it; its name says what changed:
`state` (the first event, then whenever the state or the attempt number changes) or
`progress` (only the progress did). The stream ends after the event of a terminal state, or
when the task is deleted. A comment line every `HEARTBEAT` seconds keeps proxies from closing
a quiet stream. The changes come from the process's watcher (`app.watch`), never a timer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.api.deps import DurableTasks
from app.api.schemas import TaskOut
from app.enqueue import TaskClient
from store.errors import TaskNotFound
from store.models import Task, ended

HEARTBEAT = 15.0
MEDIA_TYPE = "text/event-stream"

# The 200 answer as the OpenAPI document declares it.
STREAM_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "Server-Sent Events: `state` (first, then at each change of state or attempt) and"
            " `progress`, each with the task as `GET /tasks/{id}` shows it; the stream ends"
            " once the task is terminal"
        ),
        "content": {MEDIA_TYPE: {"schema": {"type": "string"}}},
    }
}


async def task_events(task_id: str, tasks: DurableTasks) -> StreamingResponse:
    """Stream a task's changes (state, attempt, progress) as Server-Sent Events, the current
    state first, until it is terminal; 404 for an unknown task."""
    await run_in_threadpool(tasks.get, task_id)  # an unknown id answers 404, not a stream
    return StreamingResponse(
        _stream(tasks, task_id),
        media_type=MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def kind_of(before: Task | None, after: Task) -> str | None:
    """The name of the event that `after` makes after `before` (None: nothing a client of the
    stream follows changed)."""
    if before is None or (before.status, before.attempts) != (after.status, after.attempts):
        return "state"
    if before.progress != after.progress:
        return "progress"
    return None


def _data(task: Task) -> str:
    """The task as `GET /tasks/{id}` shows it, on one line (on a worker thread: a row nested
    deep takes a deep stack)."""
    return TaskOut.of(task).model_dump_json()


async def _stream(tasks: TaskClient, task_id: str) -> AsyncIterator[str]:
    # Inside the generator, so that the watch is left however the stream ends (a client
    # that goes away closes it); entered before the read, so no change after it is missed.
    with tasks.watch.changes(task_id, on_loop=True) as changes:
        number = 0
        shown: Task | None = None
        try:
            seen: list[Task | None] = [await tasks.get_async(task_id)]
        except TaskNotFound:
            return  # deleted since the check
        while True:
            for task in seen:
                if task is None:
                    return  # deleted (retention, or by hand)
                kind = kind_of(shown, task)
                if kind is None:
                    continue
                number += 1
                shown = task
                data = await run_in_threadpool(_data, task)
                yield f"id: {number}\nevent: {kind}\ndata: {data}\n\n"
                if ended(task.status):
                    return
            seen = await changes.next_async(HEARTBEAT)
            if changes.closed:
                return  # the service is stopping: the client reconnects to another
            if not seen:
                yield ": heartbeat\n\n"
