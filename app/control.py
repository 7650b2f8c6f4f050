"""A task once enqueued, from Python: read it, await its outcome, cancel it, retry it.

The Python half of `store.control` (the operator's actions) and of `GET /tasks/{id}?wait=`:
the HTTP API and the CLI call these methods too, so that each action has one implementation.
Every method works on any process's task: the database is the truth, and `wait` hears the
task end through the process's watcher (`app.watch`), not on a timer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from app.errors import TaskCancelled, TaskFailed, WaitTimeout
from app.observability.metrics import TaskMetrics
from app.watch import TaskWatch
from store import control
from store import tasks as store_tasks
from store.engine import Database
from store.errors import TaskNotFound
from store.models import Task, TaskStatus, ended


class TaskControl:
    """Reads, awaits, cancels and retries tasks (the part of `TaskClient` that is not the
    enqueue). Each method has an `_async` twin for callers on an event loop."""

    def __init__(
        self,
        db: Database,
        wake: Callable[[], None] | None = None,
        *,
        on_cancel: Callable[[str], None] | None = None,
        timeout: float | None = None,
        metrics: TaskMetrics | None = None,
    ) -> None:
        self.db = db
        # This process's counts (`/metrics`): a cancel of a task not running is counted
        # here; a running one's by the runner when its function stops.
        self.metrics = metrics or TaskMetrics()
        # How long a cancel or retry waits for the write (`BACKSTOP_ENQUEUE_TIMEOUT`) before
        # it raises `DatabaseUnavailable`, nothing written; None: the database's own wait.
        self._timeout = timeout
        # Claims now in this process's runner (a retried task is due at once).
        self._wake = wake or (lambda: None)
        # Stops a task this process's runner is running, once its cancel is stored.
        self._on_cancel = on_cancel or (lambda task_id: None)
        self.watch = TaskWatch(db)

    def get(self, task_id: str) -> Task:
        """The task as stored now; `TaskNotFound` when there is no such task."""
        with self.db.read() as conn:
            return store_tasks.get_task(conn, task_id)

    def wait(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait until the task ends, whichever process runs it; its result.

        Raises `TaskFailed` (with the task's `last_error`) when it failed, `TaskCancelled`
        when it was cancelled, `WaitTimeout` (a `TimeoutError`) when it is still unfinished
        after `timeout` seconds (None: no limit), `TaskNotFound` when there is no such task.
        """
        return _answer(*self._finished(task_id, timeout), timeout)

    def finished(self, task_id: str, timeout: float | None = None) -> Task:
        """The task once it is terminal, or as it is when `timeout` seconds have passed (or
        when this client closes).

        Answers the moment it ends: the process's watcher (`app.watch`) hears it."""
        return self._finished(task_id, timeout)[0]

    def _finished(self, task_id: str, timeout: float | None) -> tuple[Task, bool]:
        """`finished`, and whether the client closed meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.watch.changes(task_id) as changes:
            task = self.get(task_id)
            while not ended(task.status) and not changes.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                task = _latest(task, changes.next(remaining))
        return task, changes.closed

    def cancel(self, task_id: str) -> Task:
        """Cancel a task: queued or retrying, at once; running, when its runner stops the
        function (async functions are cancelled, sync ones see `ctx.cancelled`). Raises
        `InvalidTransition` when it already ended, `TaskNotFound` when there is none."""
        with self.db.write(wait=self._timeout) as conn:
            task = control.cancel_task(conn, task_id)
        if task.status == TaskStatus.RUNNING:
            self._on_cancel(task.id)
        else:
            self.metrics.cancelled(task.name, task.queue)
        return task

    def retry(self, task_id: str) -> Task:
        """Queue a failed or cancelled task again, due now, with a fresh attempt budget (its
        attempt history kept); `InvalidTransition` in any other state."""
        with self.db.write(wait=self._timeout) as conn:
            task = control.retry_task(conn, task_id)
        self._wake()
        return task

    async def get_async(self, task_id: str) -> Task:
        """`get` for callers on an event loop."""
        return await asyncio.to_thread(self.get, task_id)

    # The sync twin's parameter: `asyncio.timeout` around the call would raise a bare
    # TimeoutError, without the task that `WaitTimeout` carries.
    async def wait_async(self, task_id: str, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """`wait` for callers on an event loop: the loop runs on while it waits."""
        return _answer(*await self._finished_async(task_id, timeout), timeout)

    async def finished_async(self, task_id: str, seconds: float | None = None) -> Task:
        """`finished` for callers on an event loop (`seconds`: its `timeout`)."""
        return (await self._finished_async(task_id, seconds))[0]

    async def _finished_async(self, task_id: str, seconds: float | None) -> tuple[Task, bool]:
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        with self.watch.changes(task_id, on_loop=True) as changes:
            task = await self.get_async(task_id)
            while not ended(task.status) and not changes.closed:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                task = _latest(task, await changes.next_async(remaining))
        return task, changes.closed

    async def cancel_async(self, task_id: str) -> Task:
        """`cancel` for callers on an event loop."""
        return await asyncio.to_thread(self.cancel, task_id)

    async def retry_async(self, task_id: str) -> Task:
        """`retry` for callers on an event loop."""
        return await asyncio.to_thread(self.retry, task_id)

    def close(self) -> None:
        """Stop the watcher's thread; a `wait` still waiting raises RuntimeError."""
        self.watch.close()


def _latest(task: Task, seen: list[Task | None]) -> Task:
    """The task as the watcher last read it (`task` when it read nothing new);
    `TaskNotFound` when it no longer exists (deleted by retention, or by hand)."""
    for changed in seen:
        if changed is None:
            raise TaskNotFound(task.id)
        task = changed
    return task


def _answer(task: Task, closed: bool, timeout: float | None) -> Any:
    """What `wait` answers: `result_of`, unless the client closed before the task ended."""
    if closed and not ended(task.status):
        raise RuntimeError(f"the task client closed while waiting on task {task.id}")
    return result_of(task, timeout)


def result_of(task: Task, timeout: float | None) -> Any:
    """What `wait` answers for the task as `finished` left it: the result, or the error."""
    if task.status == TaskStatus.SUCCEEDED:
        return task.result
    if task.status == TaskStatus.CANCELLED:
        raise TaskCancelled(task)
    if task.status == TaskStatus.FAILED:
        raise TaskFailed(task)
    raise WaitTimeout(task, timeout or 0.0)
