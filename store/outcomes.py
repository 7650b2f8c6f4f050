"""The outcome of an attempt, written only while the caller still holds the task's lease."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import AttemptOutcome, Lease, Task, TaskStatus, attempt_table, task_table
from store.tasks import to_task
from store.timeutil import utcnow

t = task_table
a = attempt_table


def _close(
    conn: Connection,
    lease: Lease,
    values: dict[str, Any],
    attempt: dict[str, Any],
    *,
    expired: bool,
    now: datetime,
) -> Task | None:
    # The fence: the same token, still running, and (for the runner) a lease that has not
    # lapsed, or (for the reclaimer) one that has. Both sides cannot match at the same time,
    # so a late completion and a reclaim never both apply.
    held = t.c.lease_expires_at <= now if expired else t.c.lease_expires_at > now
    fence = (
        t.c.id == lease.task_id,
        t.c.lease_token == lease.token,
        t.c.status == TaskStatus.RUNNING,
        held,
    )
    released = {"lease_owner": None, "lease_expires_at": None}
    row = conn.execute(
        sa.update(t)
        .where(*fence, t.c.cancel_requested_at.is_(None))
        .values(**released, **values)
        .returning(*t.c)
    ).first()
    if row is None:
        # Asked to stop while it ran: whatever the function did, the task ends cancelled
        # and its result, if any, is discarded.
        row = conn.execute(
            sa.update(t)
            .where(*fence, t.c.cancel_requested_at.is_not(None))
            .values(
                **released,
                status=TaskStatus.CANCELLED,
                finished_at=now,
                last_error=values.get("last_error", t.c.last_error),
            )
            .returning(*t.c)
        ).first()
        if row is None:
            return None
        attempt = {**attempt, "outcome": AttemptOutcome.CANCELLED}
    task = to_task(row)
    conn.execute(
        sa.update(a)
        .where(a.c.task_id == task.id, a.c.number == task.attempts, a.c.finished_at.is_(None))
        .values(finished_at=now, **attempt)
    )
    return task


def mark_succeeded(
    conn: Connection, lease: Lease, result: Any, *, now: datetime | None = None
) -> Task | None:
    """Record a successful attempt; None (nothing written) when the lease is no longer held."""
    now = now or utcnow()
    return _close(
        conn,
        lease,
        {"status": TaskStatus.SUCCEEDED, "finished_at": now, "result": result},
        {"outcome": AttemptOutcome.SUCCEEDED},
        expired=False,
        now=now,
    )


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
    return _close(
        conn,
        lease,
        values,
        {"outcome": outcome, "error": error, "traceback": traceback},
        expired=expired,
        now=now,
    )


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
