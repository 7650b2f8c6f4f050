"""What the queue looks like: counts per state and queue, and how late the oldest work is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import CLAIMABLE_WHERE, TaskStatus, task_table
from store.timeutil import utcnow

t = task_table


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts per state for every queue, and the age of the oldest due task."""

    counts: dict[TaskStatus, int]
    queues: dict[str, dict[TaskStatus, int]]
    oldest_due_seconds: float | None


def task_stats(conn: Connection, *, now: datetime | None = None) -> QueueStats:
    """Counts per state and per queue, and how long the oldest due task has waited."""
    now = now or utcnow()
    counts = dict.fromkeys(TaskStatus, 0)
    queues: dict[str, dict[TaskStatus, int]] = {}
    grouped = sa.select(t.c.queue, t.c.status, sa.func.count()).group_by(t.c.queue, t.c.status)
    for queue, status, count in conn.execute(grouped):
        state = TaskStatus(status)
        counts[state] += count
        queues.setdefault(queue, dict.fromkeys(TaskStatus, 0))[state] = count
    oldest = conn.execute(
        sa.select(sa.func.min(t.c.scheduled_at)).where(
            sa.text(CLAIMABLE_WHERE), t.c.scheduled_at <= now
        )
    ).scalar_one_or_none()
    age = None if oldest is None else max((now - oldest).total_seconds(), 0.0)
    return QueueStats(counts, dict(sorted(queues.items())), age)
