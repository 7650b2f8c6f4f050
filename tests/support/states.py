"""Tasks put in a given state at a given time, the way the runner gets them there."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime, timedelta
from uuid import uuid4

from sqlalchemy.engine import Connection

from store.control import cancel_task
from store.engine import Database
from store.leases import claim_due
from store.models import Claim, Task, TaskStatus, lease_of
from store.outcomes import mark_failed, mark_succeeded, schedule_retry
from store.tasks import NewTask, enqueue, get_tasks


def as_claimed(task: Task) -> Claim:
    """A stored running task as its claim handed it out, to compare the two."""
    return Claim(**{f.name: getattr(task, f.name) for f in fields(Claim) if f.name != "row"})


def _new(conn: Connection, at: datetime, queue: str | None, scheduled_at: datetime | None) -> str:
    # A queue of its own unless one is named, so that the claim that may follow takes this
    # very task. In a named queue, make the tasks that are claimed before the queued ones.
    new = NewTask(
        name="test.noop", queue=queue or f"q-{uuid4().hex[:8]}", scheduled_at=scheduled_at
    )
    enqueue(conn, new, now=at)
    return new.id


def _claimed(conn: Connection, at: datetime, queue: str | None) -> str:
    task_id = _new(conn, at, queue, None)
    (task,) = get_tasks(conn, [task_id])
    claimed = claim_due(conn, "w", 1, lease_seconds=3600, queue=task.queue, now=at)
    assert [t.id for t in claimed] == [task_id], "another due task of the queue was claimed"
    return task_id


def finished(db: Database, status: TaskStatus, at: datetime, *, queue: str | None = None) -> str:
    """A task that reached the terminal `status` at `at` (one attempt, unless cancelled
    before it ran)."""
    started = at - timedelta(seconds=1)
    with db.write() as conn:
        if status is TaskStatus.CANCELLED:
            return cancel_task(conn, _new(conn, started, queue, None), now=at).id
        (task,) = get_tasks(conn, [_claimed(conn, started, queue)])
        if status is TaskStatus.SUCCEEDED:
            done = mark_succeeded(conn, lease_of(task), None, now=at)
        else:
            done = mark_failed(conn, lease_of(task), "Boom: no", None, now=at)
        assert done is not None
        assert done.status is status
        return done.id


def unfinished(
    db: Database,
    status: TaskStatus,
    since: datetime,
    *,
    queue: str | None = None,
    due: datetime | None = None,
) -> str:
    """A task that entered the waiting or running `status` at `since` and is still there;
    `due` is when a queued or retrying one may run (`since` for a queued one by default)."""
    with db.write() as conn:
        if status is TaskStatus.QUEUED:
            return _new(conn, since, queue, due)
        task_id = _claimed(conn, since, queue)
        if status is TaskStatus.RUNNING:
            return task_id
        (task,) = get_tasks(conn, [task_id])
        run_at = due or since + timedelta(days=36500)
        later = schedule_retry(conn, lease_of(task), "Boom: again", None, run_at, now=since)
        assert later is not None
        return later.id
