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
from store.schedules import advance_schedule
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


def one_of_each(db: Database, at: datetime) -> dict[str, str]:
    """A queue with a task in every state as of `at`, by state (`delayed`: queued, due later),
    with a result, errors, tracebacks, several attempts and a schedule. No runner is at work
    at `at`: the running task's lease expired an hour before."""
    hour = timedelta(hours=1)
    early = at - 3 * hour
    trace = 'Traceback (most recent call last):\n  File "t.py", line 1\nValueError: no'
    ids: dict[str, str] = {}
    with db.write() as conn:
        queued = NewTask(name="test.noop", args=[1, "é", 2.5], kwargs={"deep": {"b": [None]}})
        ids["queued"] = enqueue(conn, queued, now=at - hour).id
        delayed = NewTask(name="test.noop", priority=7, scheduled_at=at + hour, queue="later")
        ids["delayed"] = enqueue(conn, delayed, now=at - hour).id

        keyed = NewTask(name="test.noop", queue="ok", idempotency_key="k-1", request_hash="ab")
        enqueue(conn, keyed, now=early)
        (claim,) = claim_due(conn, "w1", 1, lease_seconds=60, queue="ok", now=early)
        done = mark_succeeded(conn, claim.lease, {"rows": [1, 2.5, "ü"], "n": None}, now=early)
        assert done is not None
        ids["succeeded"] = done.id

        enqueue(conn, NewTask(name="test.noop", queue="bad", max_attempts=2), now=early)
        (claim,) = claim_due(conn, "w1", 1, lease_seconds=60, queue="bad", now=early)
        assert schedule_retry(conn, claim.lease, "ValueError: no", trace, early, now=early)
        (claim,) = claim_due(conn, "w2", 1, lease_seconds=7200, queue="bad", now=early)
        failed = mark_failed(conn, claim.lease, "ValueError: no", trace, now=early + hour)
        assert failed is not None
        ids["failed"] = failed.id

        enqueue(conn, NewTask(name="test.noop", queue="again"), now=early)
        (claim,) = claim_due(conn, "w1", 1, lease_seconds=60, queue="again", now=early)
        retrying = schedule_retry(conn, claim.lease, "ValueError: no", trace, at, now=early)
        assert retrying is not None
        ids["retrying"] = retrying.id

        enqueue(conn, NewTask(name="test.noop", queue="died"), now=early)
        (claim,) = claim_due(conn, "w3", 1, lease_seconds=3600, queue="died", now=at - 2 * hour)
        ids["running"] = claim.id

        ids["cancelled"] = cancel_task(
            conn, enqueue(conn, NewTask(name="test.noop"), now=early).id, now=early
        ).id
        advance_schedule(conn, "nightly", at - hour, now=at - hour)
        advance_schedule(conn, "hourly", at, now=at)
    return ids
