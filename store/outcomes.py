"""The outcome of an attempt, written only while the caller still holds the task's lease."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store import dependencies
from store.attempts import of_task
from store.changes import notify, notify_changed
from store.driver import Driver
from store.models import AttemptOutcome, Lease, Task, TaskStatus, attempt_table, task_table
from store.tasks import NewTask, enqueue_follow_ups, to_task
from store.timeutil import utcnow

t = task_table
a = attempt_table


# The statements are built once per shape and reused with new parameters: building them
# anew for every outcome cost SQLAlchemy ten times what SQLite spends running them.


def _fence(expired: bool) -> sa.ColumnElement[bool]:
    # The same token, still running, and (for the runner) a lease that has not lapsed, or
    # (for the reclaimer) one that has. Both sides cannot match at the same time, so a late
    # completion and a reclaim never both apply.
    held = (
        t.c.lease_expires_at <= sa.bindparam("f_now", type_=t.c.lease_expires_at.type)
        if expired
        else t.c.lease_expires_at > sa.bindparam("f_now", type_=t.c.lease_expires_at.type)
    )
    return sa.and_(
        t.c.id == sa.bindparam("f_id"),
        t.c.lease_token == sa.bindparam("f_token"),
        t.c.status == TaskStatus.RUNNING,
        held,
    )


@functools.cache
def _close_statement(columns: tuple[str, ...], expired: bool) -> sa.Update:
    return (
        sa.update(t)
        .where(_fence(expired), t.c.cancel_requested_at.is_(None))
        .values(
            lease_owner=None,
            lease_expires_at=None,
            **{name: sa.bindparam(f"v_{name}", type_=t.c[name].type) for name in columns},
        )
        .returning(*t.c)
    )


@functools.cache
def _cancel_statement(expired: bool, keeps_error: bool) -> sa.Update:
    # Asked to stop while it ran: whatever the function did, the task ends cancelled and its
    # result, if any, is discarded.
    last_error = sa.bindparam("v_last_error", type_=t.c.last_error.type)
    return (
        sa.update(t)
        .where(_fence(expired), t.c.cancel_requested_at.is_not(None))
        .values(
            lease_owner=None,
            lease_expires_at=None,
            status=TaskStatus.CANCELLED,
            finished_at=sa.bindparam("v_finished_at", type_=t.c.finished_at.type),
            last_error=last_error if keeps_error else t.c.last_error,
        )
        .returning(*t.c)
    )


@functools.cache
def _attempt_statement(columns: tuple[str, ...]) -> sa.Update:
    return (
        sa.update(a)
        .where(
            *of_task(sa.bindparam("a_task_id")),
            a.c.number == sa.bindparam("a_number"),
            a.c.finished_at.is_(None),
        )
        .values(
            finished_at=sa.bindparam("a_finished_at", type_=a.c.finished_at.type),
            **{name: sa.bindparam(f"a_{name}", type_=a.c[name].type) for name in columns},
        )
    )


def _close(
    conn: Connection,
    lease: Lease,
    values: dict[str, Any],
    attempt: dict[str, Any],
    *,
    expired: bool,
    now: datetime,
) -> Task | None:
    fence = {"f_id": lease.task_id, "f_token": lease.token, "f_now": now}
    columns = tuple(sorted(values))
    row = conn.execute(
        _close_statement(columns, expired),
        {**fence, **{f"v_{name}": values[name] for name in columns}},
    ).first()
    if row is None:
        keeps_error = "last_error" in values
        params = {**fence, "v_finished_at": now}
        if keeps_error:
            params["v_last_error"] = values["last_error"]
        row = conn.execute(_cancel_statement(expired, keeps_error), params).first()
        if row is None:
            return None
        attempt = {**attempt, "outcome": AttemptOutcome.CANCELLED}
    task = to_task(row)
    notify_changed(conn, [task.id])
    if task.has_dependants:
        dependencies.settle(conn, task.id, task.status, now=now)
    fields = tuple(sorted(attempt))
    conn.execute(
        _attempt_statement(fields),
        {
            "a_task_id": task.id,
            "a_number": task.attempts,
            "a_finished_at": now,
            **{f"a_{name}": attempt[name] for name in fields},
        },
    )
    return task


def mark_succeeded(
    conn: Connection,
    lease: Lease,
    result: Any,
    *,
    follow_ups: Sequence[NewTask] = (),
    now: datetime | None = None,
) -> Task | None:
    """Record a successful attempt, and enqueue its `follow_ups` with it; None (nothing
    written, no follow-up either) when the lease is no longer held. A task that was asked
    to stop ends `cancelled` instead, its follow-ups discarded."""
    now = now or utcnow()
    task = _close(
        conn,
        lease,
        {"status": TaskStatus.SUCCEEDED, "finished_at": now, "result": result},
        {"outcome": AttemptOutcome.SUCCEEDED},
        expired=False,
        now=now,
    )
    if task is not None and task.status == TaskStatus.SUCCEEDED and follow_ups:
        enqueue_follow_ups(conn, [(new, now) for new in follow_ups])
    return task


def _succeeded(key: str) -> tuple[str, str]:
    """The two statements of a success, finding the task's row by `key` (`?`: the key, then
    the task's id), then the task's creation time (the attempt's key) on that row."""
    task = (
        "UPDATE task SET status = 'succeeded', lease_owner = NULL, lease_expires_at = NULL,"
        f" finished_at = ?, result = ? WHERE {key} AND lease_token = ? AND status = 'running'"
        " AND lease_expires_at > ? AND cancel_requested_at IS NULL AND has_dependants = 0"
    )
    attempt = (
        "UPDATE attempt SET finished_at = ?, outcome = 'succeeded'"
        f" WHERE task_created_at = (SELECT created_at FROM task WHERE {key}) AND task_id = ?"
        " AND number = ? AND finished_at IS NULL"
    )
    return task, attempt


# A task with dependants does not match (`has_dependants = 0`): it goes the long way, which
# releases them (`mark_succeeded`), and the common batch needs no statement to look for any.
# By id, through the index of ids; by rowid on SQLite when every lease knows its row: the ids
# are random, so at a large history each lookup by id reads a page no other task shares.
# Parameters of the task's: finished_at, result, [row,] id, token, now; of the attempt's:
# finished_at, [row,] id, id, number.
SUCCEEDED_BY_ID = _succeeded("id = ?")
SUCCEEDED_BY_ROW = _succeeded("rowid = ? AND id = ?")


@dataclass(slots=True)
class Outcome:
    """What came of one attempt, ready to be written under its lease.

    A success when `error` is None; otherwise a failure that is retried at `run_at`, or ends
    the task when `run_at` is None. `number` is the attempt's number (the claim's `attempts`).
    """

    lease: Lease
    number: int
    now: datetime
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    run_at: datetime | None = None
    # What a successful attempt enqueued through `ctx.add_task`: stored with its success.
    follow_ups: tuple[NewTask, ...] = ()


def record(conn: Connection, outcomes: Sequence[Outcome]) -> list[TaskStatus | None]:
    """Write the outcomes of attempts that finished together; each one's new task state, or
    None where the lease is no longer held and nothing was written.

    Successes, the bulk of a busy runner's writes, go in one statement per table; failures,
    rarer and each with its own values, one at a time.
    """
    successes = _mark_many_succeeded(
        conn, [outcome for outcome in outcomes if outcome.error is None]
    )
    states: list[TaskStatus | None] = []
    for outcome in outcomes:
        if outcome.error is None:
            states.append(next(successes))
            continue
        task = fail_attempt(
            conn, outcome.lease, outcome.error, outcome.traceback, outcome.run_at, now=outcome.now
        )
        states.append(None if task is None else task.status)
    return states


# PostgreSQL's form: every success of the batch in one statement, the values as arrays (the
# tasks' ids, tokens, finish times, results, attempt numbers), each task under the same fence
# as `SUCCEEDED_BY_ID`'s, and the attempt rows of the tasks it closed; the ids of those tasks
# come back. One round trip however large the batch.
SUCCEEDED_ARRAYS = (
    "WITH v AS (SELECT * FROM unnest(?::varchar[], ?::int[], ?::timestamptz[], ?::json[],"
    " ?::int[]) AS v(id, token, finished_at, result, number)),"
    " closed AS (UPDATE task SET status = 'succeeded', lease_owner = NULL,"
    " lease_expires_at = NULL, finished_at = v.finished_at, result = v.result"
    " FROM v WHERE task.id = v.id AND task.lease_token = v.token AND task.status = 'running'"
    " AND task.lease_expires_at > v.finished_at AND task.cancel_requested_at IS NULL"
    " RETURNING task.id, task.created_at, v.finished_at, v.number, task.has_dependants),"
    " attempts AS (UPDATE attempt SET finished_at = closed.finished_at, outcome = 'succeeded'"
    " FROM closed WHERE attempt.task_created_at = closed.created_at"
    " AND attempt.task_id = closed.id AND attempt.number = closed.number"
    " AND attempt.finished_at IS NULL)"
    " SELECT id, has_dependants FROM closed"
)


def _mark_many_succeeded(conn: Connection, done: Sequence[Outcome]) -> Iterator[TaskStatus | None]:
    """Each success's new state: `succeeded`, `cancelled` (it was asked to stop while it
    ran), or None when the lease is no longer held.

    The common case, every lease held and nothing cancelled, costs two executemany calls
    (on PostgreSQL, one statement); when any row does not match, the batch is undone to a
    savepoint and written one by one (on PostgreSQL, only the rows that did not match).
    """
    if not done:
        return iter(())
    driver = Driver(conn)
    if not driver.sqlite:
        return _mark_many_succeeded_at_once(conn, driver, done)
    stamps = [driver.stamp(outcome.now) for outcome in done]
    by_row = all(outcome.lease.row is not None for outcome in done)
    task_statement, attempt_statement = SUCCEEDED_BY_ROW if by_row else SUCCEEDED_BY_ID
    keys = [(o.lease.row, o.lease.task_id) if by_row else (o.lease.task_id,) for o in done]
    driver.execute("SAVEPOINT backstop_successes")
    updated = driver.execute_many(
        task_statement,
        [
            (stamp, driver.json(o.result), *key, o.lease.token, stamp)
            for o, stamp, key in zip(done, stamps, keys, strict=True)
        ],
    )
    if updated == len(done):
        driver.execute("RELEASE SAVEPOINT backstop_successes")
        notify_changed(conn, [o.lease.task_id for o in done])
        driver.execute_many(
            attempt_statement,
            [
                (stamp, *key, o.lease.task_id, o.number)
                for o, stamp, key in zip(done, stamps, keys, strict=True)
            ],
        )
        _follow_up(conn, done)
        return iter([TaskStatus.SUCCEEDED] * len(done))
    driver.execute("ROLLBACK TO SAVEPOINT backstop_successes")
    driver.execute("RELEASE SAVEPOINT backstop_successes")
    answers: list[TaskStatus | None] = []
    for outcome in done:
        task = mark_succeeded(
            conn, outcome.lease, outcome.result, follow_ups=outcome.follow_ups, now=outcome.now
        )
        answers.append(None if task is None else task.status)
    return iter(answers)


def _follow_up(conn: Connection, done: Sequence[Outcome]) -> None:
    """Enqueue the follow-ups of these successes, just recorded."""
    items = [(new, o.now) for o in done for new in o.follow_ups]
    if items:
        enqueue_follow_ups(conn, items)


def _mark_many_succeeded_at_once(
    conn: Connection, driver: Driver, done: Sequence[Outcome]
) -> Iterator[TaskStatus | None]:
    """`_mark_many_succeeded` on PostgreSQL: one statement for the batch; a task it did not
    close (lease lost, or asked to stop) has had nothing written, and goes the long way."""
    original = done
    # In the order of the ids, as `store.dependencies` locks parents: an enqueue naming two
    # tasks of the batch then never holds one while this statement holds the other.
    done = sorted(done, key=lambda o: o.lease.task_id)
    rows = driver.execute(
        SUCCEEDED_ARRAYS,
        [
            [o.lease.task_id for o in done],
            [o.lease.token for o in done],
            [driver.stamp(o.now) for o in done],
            [driver.json(o.result) for o in done],
            [o.number for o in done],
        ],
    )
    closed = {task_id for task_id, _ in rows}
    if closed:
        notify_changed(conn, sorted(closed))  # whoever watches them hears them end
        # The flag as the UPDATE found it once it held the row: an enqueue that named one
        # of these tasks and committed meanwhile has set it, and this next statement (a
        # new snapshot) sees its links.
        parents = [task_id for task_id, dependants in rows if dependants]
        if parents:
            dependencies.release(conn, parents, now=max(o.now for o in done))
        _follow_up(conn, [o for o in done if o.lease.task_id in closed])
    answers: dict[str, TaskStatus | None] = {}
    for outcome in done:
        if outcome.lease.task_id in closed:
            answers[outcome.lease.task_id] = TaskStatus.SUCCEEDED
            continue
        task = mark_succeeded(
            conn, outcome.lease, outcome.result, follow_ups=outcome.follow_ups, now=outcome.now
        )
        answers[outcome.lease.task_id] = None if task is None else task.status
    return iter([answers[o.lease.task_id] for o in original])


def fail_attempt(
    conn: Connection,
    lease: Lease,
    error: str,
    traceback: str | None,
    run_at: datetime | None,
    *,
    outcome: AttemptOutcome = AttemptOutcome.FAILED,
    expired: bool = False,
    extra: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Task | None:
    """Record a failed attempt: `retrying` until `run_at`, or `failed` when `run_at` is None.

    None (nothing written) when the lease is no longer held.
    """
    now = now or utcnow()
    values: dict[str, Any] = {"last_error": error, **(extra or {})}
    if run_at is None:
        values.update(status=TaskStatus.FAILED, finished_at=now)
    else:
        values.update(status=TaskStatus.RETRYING, scheduled_at=run_at)
    task = _close(
        conn,
        lease,
        values,
        {"outcome": outcome, "error": error, "traceback": traceback},
        expired=expired,
        now=now,
    )
    if task is not None and task.status == TaskStatus.RETRYING and task.scheduled_at <= now:
        # Any runner may take a retry due at once, not only this one: it must not wait for
        # the others' next poll. (One due later is found by the polls.)
        notify(conn, [task.queue])
    return task


def schedule_retry(
    conn: Connection,
    lease: Lease,
    error: str,
    traceback: str | None,
    run_at: datetime,
    *,
    now: datetime | None = None,
) -> Task | None:
    """Record a failed attempt that will be tried again at `run_at` (state `retrying`)."""
    return fail_attempt(conn, lease, error, traceback, run_at, now=now)


def mark_failed(
    conn: Connection,
    lease: Lease,
    error: str,
    traceback: str | None,
    *,
    now: datetime | None = None,
) -> Task | None:
    """Record a failed attempt that ends the task (state `failed`)."""
    return fail_attempt(conn, lease, error, traceback, None, now=now)
