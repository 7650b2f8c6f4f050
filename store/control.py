"""Operator actions on a task: cancel it, run it again."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store import dependencies
from store.changes import notify, notify_cancel, notify_changed
from store.errors import InvalidTransition, UniqueKeyTaken
from store.models import CLAIMABLE, Task, TaskStatus, task_table
from store.tasks import get_task, to_task, unique_key_holder
from store.timeutil import utcnow

t = task_table

RETRYABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED)


def cancel_task(conn: Connection, task_id: str, *, now: datetime | None = None) -> Task:
    """Cancel a task: a waiting one at once; a running one is asked to stop.

    A running task keeps its state until its runner sees the request and stops the function;
    its outcome is then recorded as `cancelled` (`store.outcomes`). A finished task raises
    `InvalidTransition`; `TaskNotFound` when there is no such task.
    """
    now = now or utcnow()
    waiting = conn.execute(
        sa.update(t)
        .where(t.c.id == task_id, t.c.status.in_(CLAIMABLE))
        .values(status=TaskStatus.CANCELLED, finished_at=now, cancel_requested_at=now)
        .returning(*t.c)
    ).first()
    if waiting is not None:
        notify_changed(conn, [task_id])
        task = to_task(waiting)
        if task.has_dependants:
            dependencies.cancel_dependants(conn, {task.id: task.status}, now=now)
        return task
    running = conn.execute(
        sa.update(t)
        .where(t.c.id == task_id, t.c.status == TaskStatus.RUNNING)
        .values(cancel_requested_at=sa.func.coalesce(t.c.cancel_requested_at, now))
        .returning(*t.c)
    ).first()
    if running is not None:
        notify_cancel(conn, [task_id])  # its runner stops it at once, not at its next check
        return to_task(running)
    task = get_task(conn, task_id)
    raise InvalidTransition(task.id, task.status, "cancelled", "queued, retrying or running")


def retry_task(conn: Connection, task_id: str, *, now: datetime | None = None) -> Task:
    """Queue a failed or cancelled task again, due now, with a fresh attempt budget.

    Its attempt history stays; `InvalidTransition` for any other state, `UniqueKeyTaken`
    when another task now holds its unique key (nothing changes then). A task that runs
    `after=` others waits again for those that have not succeeded; `ParentNotSucceeded`
    when one of them failed or was cancelled (retry that one first).
    """
    now = now or utcnow()
    after = conn.execute(
        sa.select(t.c.after).where(t.c.id == task_id, t.c.status.in_(RETRYABLE))
    ).scalar_one_or_none()
    try:
        # In a savepoint: on PostgreSQL a broken constraint spoils the whole transaction,
        # and a refused retry must take its renewed links back with it.
        with conn.begin_nested():
            waiting_on = dependencies.relink(conn, task_id, after) if after else 0
            row = conn.execute(_requeue(task_id, waiting_on, now)).first()
    except sa.exc.IntegrityError:
        # Only uq_task_unique_key_active can refuse this row; the index, not a check made
        # beforehand, decides, so an enqueue racing with the retry cannot slip in between.
        task = get_task(conn, task_id)
        holder = None if task.unique_key is None else unique_key_holder(conn, task.unique_key)
        if task.unique_key is None or holder is None:
            raise
        raise UniqueKeyTaken(task.id, task.unique_key, holder.id) from None
    if row is not None:
        task = to_task(row)
        notify(conn, [task.queue])
        notify_changed(conn, [task.id])
        return task
    task = get_task(conn, task_id)
    raise InvalidTransition(task.id, task.status, "retried", "failed or cancelled")


def _requeue(task_id: str, waiting_on: int, now: datetime) -> sa.Update:
    return (
        sa.update(t)
        .where(t.c.id == task_id, t.c.status.in_(RETRYABLE))
        .values(
            waiting_on=waiting_on,
            status=TaskStatus.QUEUED,
            attempts=0,
            expirations=0,
            scheduled_at=now,
            finished_at=None,
            result=None,
            cancel_requested_at=None,
            progress=None,
        )
        .returning(*t.c)
    )


def cancel_requested(conn: Connection, task_ids: list[str]) -> set[str]:
    """Which of these running tasks were asked to stop."""
    if not task_ids:
        return set()
    query = sa.select(t.c.id).where(
        t.c.id.in_(task_ids),
        t.c.status == TaskStatus.RUNNING,
        t.c.cancel_requested_at.is_not(None),
    )
    return set(conn.execute(query).scalars())
