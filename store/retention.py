"""Pruning finished tasks (and, by cascade, their attempts) past their age."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import TERMINAL_WHERE, TaskStatus, attempt_table, task_table

t = task_table
a = attempt_table


def prune_finished(
    conn: Connection,
    statuses: Sequence[TaskStatus],
    finished_before: datetime,
    *,
    limit: int = 500,
) -> int:
    """Delete up to `limit` tasks in `statuses` that finished before `finished_before`.

    Small batches keep each write transaction short, so enqueues are never held up for
    long; call again until it returns less than `limit`. Returns how many were deleted.
    """
    doomed = (
        sa.select(t.c.id)
        .where(
            sa.text(TERMINAL_WHERE),
            t.c.status.in_(list(statuses)),
            t.c.finished_at < finished_before,
        )
        .order_by(t.c.finished_at)
        .limit(limit)
    )
    ids = list(conn.execute(doomed).scalars())
    if not ids:
        return 0
    # Attempts go first, explicitly: a PostgreSQL cascade would do it, but SQLite only
    # cascades on connections that turned foreign keys on.
    conn.execute(sa.delete(a).where(a.c.task_id.in_(ids)))
    conn.execute(sa.delete(t).where(t.c.id.in_(ids)))
    return len(ids)
