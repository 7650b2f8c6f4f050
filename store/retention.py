"""Pruning finished tasks (and their attempts) past their age."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import TERMINAL_WHERE, TaskStatus, attempt_table, task_table

t = task_table
a = attempt_table


def prune_finished(
    conn: Connection,
    status: TaskStatus,
    finished_before: datetime,
    *,
    limit: int = 500,
) -> int:
    """Delete up to `limit` tasks in the terminal `status` that finished before
    `finished_before`, oldest first, with their attempts. Returns how many were deleted.

    Small batches keep each write transaction short, so enqueues are never held up for
    long; call again until it returns less than `limit`.
    """
    if not status.terminal:
        raise ValueError(f"only finished tasks are pruned, not {status.value!r} ones")
    # One state per call: `status = ? AND finished_at < ? ORDER BY finished_at` reads
    # ix_task_prune in order and stops after `limit` rows. With `status IN (?, ?)` SQLite
    # would sort every match first, the whole backlog on each batch. The literal
    # TERMINAL_WHERE is what lets SQLite use the partial index at all.
    past_age = (sa.text(TERMINAL_WHERE), t.c.status == status, t.c.finished_at < finished_before)
    doomed = sa.select(t.c.id).where(*past_age).order_by(t.c.finished_at).limit(limit)
    ids = list(conn.execute(doomed).scalars())
    if not ids:
        return 0
    # The delete repeats the test: on SQLite the write lock makes it redundant, but on
    # PostgreSQL a retry may have queued one of these tasks again since the select.
    deleted = conn.execute(
        sa.delete(t).where(t.c.id.in_(ids), *past_age).returning(t.c.created_at, t.c.id)
    ).all()
    # The foreign key cascades to the attempts on PostgreSQL and on Backstop's SQLite
    # connections (`PRAGMA foreign_keys=ON`); this covers a connection without it.
    # Two lists, not one of pairs: SQLite scans the table for a row-value IN.
    if deleted:
        created = {row.created_at for row in deleted}
        gone = [row.id for row in deleted]
        conn.execute(sa.delete(a).where(a.c.task_created_at.in_(created), a.c.task_id.in_(gone)))
    return len(deleted)
