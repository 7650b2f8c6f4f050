"""Leases: claiming due tasks, keeping them, and taking them back.

A running task is held by one runner under a lease: an owner, an expiry and a fencing token
(`lease_token`, bumped by every claim). Outcomes are written only under the lease
(`store.outcomes`), so a runner that lost its lease can never overwrite its successor's work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store import dependencies
from store.attempts import of_task
from store.changes import notify, notify_changed
from store.driver import Driver
from store.jsonvalues import escaped_text
from store.models import (
    CLAIMABLE_STATUS,
    CLAIMABLE_WHERE,
    RUNNING_WHERE,
    AttemptOutcome,
    Claim,
    Lease,
    Task,
    TaskStatus,
    attempt_table,
    lease_of,
    task_table,
)
from store.outcomes import fail_attempt
from store.tasks import to_task
from store.timeutil import utcnow

t = task_table
a = attempt_table

LEASE_EXPIRED = "lease expired"


# What a claim reads back: enough to run the task, nothing to rebuild a whole `Task` from.
_CLAIMED = (
    "id, name, queue, priority, args, kwargs, attempts, max_attempts, lease_token,"
    " created_at, scheduled_at, trace_context"
)
# ... and where the row is: its rowid on SQLite (PostgreSQL has no stable equivalent).
_ROW = {"sqlite": "rowid", "postgresql": "NULL"}


def claim_statement(dialect: str, *, by_queue: bool, excluded: int = 0) -> str:
    """The claim, with `?` placeholders for owner, expiry, start, now, [queue,] [each of
    `excluded` queues,] limit; on PostgreSQL also start and owner again, for the attempt rows
    it inserts itself.

    On SQLite the subquery carries `CLAIMABLE_WHERE` word for word, so that the planner
    reads the partial index `ix_task_claimable` in order and stops after `limit` rows.
    `excluded` queues (the rate-limited ones, claimed apart) are skipped as that index is read.
    """
    queue = " AND queue = ?" if by_queue else ""
    if excluded:
        queue += f" AND queue NOT IN ({', '.join('?' * excluded)})"
    postgres = dialect == "postgresql"
    lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
    # SQLite finds the rows by rowid, which the index entries hold: looking them up by `id`
    # went through the primary key's index, a random page for each (ids are random UUIDs).
    key = "id" if postgres else "rowid"
    # On PostgreSQL the picked ids are an array built once (an InitPlan): as `IN (subquery)`
    # the planner may choose a nested-loop semi-join that runs the locking subquery again
    # for every row it scans, and each run, skipping the rows this statement already
    # updated, picks the next ones: a claim of LIMIT 1 took the whole queue. The outer
    # re-check is of the state alone, which no partial index implies: the rows are then
    # found through the primary key, never by a walk of the claimable index. (The lock
    # re-checks the subquery's whole WHERE on the newest row already; `waiting_on` never
    # rises on a task that is claimable.)
    pick, close = ("= ANY(ARRAY", ")") if postgres else ("IN ", "")
    recheck = CLAIMABLE_STATUS if postgres else CLAIMABLE_WHERE
    claim = (
        "UPDATE task SET status = 'running', lease_owner = ?, lease_expires_at = ?,"
        " lease_token = lease_token + 1, attempts = attempts + 1, started_at = ?, progress = NULL"
        f" WHERE {key} {pick}(SELECT {key} FROM task WHERE {CLAIMABLE_WHERE}"
        f" AND scheduled_at <= ?{queue}"
        f" ORDER BY priority DESC, scheduled_at LIMIT ?{lock}){close}"
        f" AND {recheck} RETURNING {_CLAIMED}, {_ROW[dialect]}"
    )
    if not postgres:
        return claim
    # On PostgreSQL the attempt rows go in with the claim, in the same statement: one round
    # trip to the server instead of two. (SQLite answers from inside the process: there the
    # second statement costs less than building this one's plan.)
    return (
        f"WITH claimed AS ({claim}), started AS ({_ATTEMPTS_OF_CLAIMED})"
        f" SELECT {_CLAIMED}, NULL FROM claimed"
    )


_ATTEMPT_STARTED = (
    "INSERT INTO attempt (task_id, task_created_at, number, started_at, worker)"
    " VALUES (?, ?, ?, ?, ?)"
)
_ATTEMPT_STARTED_FROM_ROW = (
    "INSERT INTO attempt (task_id, task_created_at, number, started_at, worker)"
    " SELECT id, created_at, ?, ?, ? FROM task WHERE id = ?"
)
_ATTEMPTS_OF_CLAIMED = (
    "INSERT INTO attempt (task_id, task_created_at, number, started_at, worker)"
    " SELECT id, created_at, attempts, ?, ? FROM claimed"
)


def _sendable(value: Any) -> bool:
    return not isinstance(value, str) or escaped_text(value) is value


def claim_due(
    conn: Connection,
    owner: str,
    limit: int,
    *,
    lease_seconds: float,
    queue: str | None = None,
    exclude: Sequence[str] = (),
    now: datetime | None = None,
) -> list[Claim]:
    """Claim up to `limit` due tasks (of `queue`, or of any queue but those in `exclude`),
    highest priority then oldest first, in one statement.

    Two runners can never take the same task. On SQLite the write transaction opened with
    `BEGIN IMMEDIATE` holds the database's single write lock from before the subquery reads
    until the commit, so claims run strictly one after the other and each sees the last one's
    changes. On PostgreSQL the subquery's `FOR UPDATE SKIP LOCKED` row-locks what it picks and
    skips rows another claim has locked, and the outer `status IN (...)` is re-checked on the
    locked row. Each claim bumps `lease_token` and counts the attempt; the attempt rows are
    inserted in the same transaction.
    """
    if limit <= 0:
        return []
    now = now or utcnow()
    expires = now + timedelta(seconds=lease_seconds)
    driver = Driver(conn)
    started = driver.stamp(now)
    params: list[Any] = [owner, driver.stamp(expires), started, started]
    if queue is not None:
        params.append(queue)
    params += exclude
    params.append(limit)
    if not driver.sqlite:
        params += [started, owner]
    statement = claim_statement(
        conn.dialect.name, by_queue=queue is not None, excluded=len(exclude)
    )
    rows = driver.execute(statement, params)
    if not rows:
        return []
    claimed = [
        Claim(
            id=task_id,
            name=name,
            queue=task_queue,
            # An integer written by hand as text: no priority, and no attempt after this one.
            priority=priority if isinstance(priority, int) else 0,
            args=driver.read_json(args),
            kwargs=driver.read_json(kwargs),
            attempts=attempts,
            max_attempts=max_attempts if isinstance(max_attempts, int) else attempts,
            lease_token=token,
            created_at=driver.read_stamp(created),
            scheduled_at=driver.read_stamp(scheduled),
            lease_owner=owner,
            lease_expires_at=expires,
            started_at=now,
            trace_context=trace_context,
            row=row,
        )
        for (
            task_id,
            name,
            task_queue,
            priority,
            args,
            kwargs,
            attempts,
            max_attempts,
            token,
            created,
            scheduled,
            trace_context,
            row,
        ) in rows
    ]
    # The task's creation time goes back as the driver gave it: the same value, unconverted.
    if driver.sqlite:
        attempts_started = [
            (c.id, created, c.attempts, started, owner)
            for c, (*_, created, _scheduled, _trace, _row) in zip(claimed, rows, strict=True)
        ]
        # But text written by hand that is not UTF-8 cannot go back through the driver: the
        # attempt takes that creation time from the task's row itself.
        plain, from_row = [], []
        for started_row in attempts_started:
            if _sendable(started_row[1]):
                plain.append(started_row)
            else:
                from_row.append((*started_row[2:], started_row[0]))
        driver.execute_many(_ATTEMPT_STARTED, plain)
        if from_row:
            driver.execute_many(_ATTEMPT_STARTED_FROM_ROW, from_row)
    notify_changed(conn, [c.id for c in claimed])  # whoever watches them sees them start
    claimed.sort(key=lambda task: (-task.priority, task.scheduled_at))
    return claimed


def extend_leases(
    conn: Connection,
    owner: str,
    task_ids: Sequence[str],
    *,
    lease_seconds: float,
    now: datetime | None = None,
) -> set[str]:
    """Push back the expiry of the leases `owner` still holds; returns the ids it still holds.

    A lease that already lapsed is not revived: it may be reclaimed at any moment.
    """
    if not task_ids:
        return set()
    now = now or utcnow()
    stmt = (
        sa.update(t)
        .where(
            t.c.id.in_(list(task_ids)),
            t.c.lease_owner == owner,
            t.c.status == TaskStatus.RUNNING,
            t.c.lease_expires_at > now,
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(t.c.id)
    )
    return set(conn.execute(stmt).scalars())


def renew_held(
    conn: Connection,
    held: Sequence[Lease],
    *,
    lease_seconds: float,
    now: datetime | None = None,
) -> set[str]:
    """Renew these leases, lapsed or not, as long as no reclaim took their tasks (still
    running under the same token); returns the ids renewed.

    Unlike `extend_leases` this revives a lapsed lease. For a runner that could not write
    for a while (the database locked or full) and never stopped holding its tasks: their
    functions ran on, or finished with their outcomes waiting to be written, and a reclaim
    now would run them again. A reclaim and this renewal update the same row under the same
    token, so whichever comes second finds nothing to do.
    """
    if not held:
        return set()
    now = now or utcnow()
    renewed: set[str] = set()
    for lease in held:
        row = conn.execute(
            sa.update(t)
            .where(
                t.c.id == lease.task_id,
                t.c.lease_token == lease.token,
                t.c.status == TaskStatus.RUNNING,
            )
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            .returning(t.c.id)
        ).first()
        if row is not None:
            renewed.add(row.id)
    return renewed


def reclaim_expired(
    conn: Connection,
    decide: Callable[[Task], datetime | None],
    *,
    max_expirations: int | None = None,
    now: datetime | None = None,
    limit: int = 100,
) -> list[Task]:
    """Turn lapsed leases into failed attempts with the error `lease expired`.

    `decide(task)` gives the next run time under the task's retry policy, or None to give up;
    the task goes on to `retrying` or `failed` like after any other failure. A task whose
    lease lapsed `max_expirations` times fails whatever its policy says: its runner died each
    time, so it is likely the task that kills them. Returns the tasks as they now are.
    """
    now = now or utcnow()
    expired_query = (
        sa.select(t)
        .where(sa.text(RUNNING_WHERE), t.c.lease_expires_at <= now)
        .order_by(t.c.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    reclaimed: list[Task] = []
    for task in [to_task(row) for row in conn.execute(expired_query)]:
        expirations = task.expirations + 1
        poisoned = max_expirations is not None and expirations >= max_expirations
        run_at = None if poisoned or task.attempts >= task.max_attempts else decide(task)
        error = (
            f"{LEASE_EXPIRED} {expirations} times: the task may be crashing its runner"
            if poisoned
            else LEASE_EXPIRED
        )
        done = fail_attempt(
            conn,
            lease_of(task),
            error,
            None,
            run_at,
            outcome=AttemptOutcome.LEASE_EXPIRED,
            expired=True,
            extra={"expirations": expirations},
            now=now,
        )
        if done is not None:
            reclaimed.append(done)
    return reclaimed


def release(conn: Connection, leases: Sequence[Lease], *, now: datetime | None = None) -> int:
    """Give tasks back on a graceful stop: queued again at once, the attempt not counted.

    A task that was asked to stop ends `cancelled` instead. The attempt row stays, with the
    outcome `released` (or `cancelled`), so the history shows what happened. Returns how many
    leases were still held.
    """
    now = now or utcnow()
    released = 0
    for lease in leases:
        fence = (
            t.c.id == lease.task_id,
            t.c.lease_token == lease.token,
            t.c.status == TaskStatus.RUNNING,
        )
        cleared = {"lease_owner": None, "lease_expires_at": None}
        cancelled = conn.execute(
            sa.update(t)
            .where(*fence, t.c.cancel_requested_at.is_not(None))
            .values(**cleared, status=TaskStatus.CANCELLED, finished_at=now)
            .returning(t.c.attempts, t.c.has_dependants)
        ).first()
        if cancelled is not None:
            number, outcome = cancelled.attempts, AttemptOutcome.CANCELLED
            if cancelled.has_dependants:
                dependencies.cancel_dependants(conn, {lease.task_id: TaskStatus.CANCELLED}, now=now)
        else:
            back = conn.execute(
                sa.update(t)
                .where(*fence)
                .values(
                    **cleared,
                    status=TaskStatus.QUEUED,
                    attempts=t.c.attempts - 1,
                    scheduled_at=now,
                )
                .returning(t.c.attempts, t.c.queue)
            ).first()
            if back is None:
                continue
            number, outcome = back.attempts + 1, AttemptOutcome.RELEASED
            notify(conn, [back.queue])  # a runner still running takes it at once
        released += 1
        notify_changed(conn, [lease.task_id])
        conn.execute(
            sa.update(a)
            .where(*of_task(lease.task_id), a.c.number == number, a.c.finished_at.is_(None))
            .values(finished_at=now, outcome=outcome)
        )
    return released
