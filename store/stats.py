"""What the queue looks like: counts per state and queue, and how late the oldest work is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import CLAIMABLE, CLAIMABLE_WHERE, RUNNING_WHERE, TaskStatus, task_table
from store.timeutil import utcnow

t = task_table


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts per state for every queue, and the age of the oldest due task."""

    counts: dict[TaskStatus, int]
    queues: dict[str, dict[TaskStatus, int]]
    oldest_due_seconds: float | None


@dataclass(frozen=True, slots=True)
class QueueOverview:
    """One queue: its tasks per state, and how long its oldest due task has waited (None:
    nothing is due)."""

    counts: dict[TaskStatus, int]
    oldest_due_seconds: float | None


def queue_overview(
    conn: Connection, now: datetime | None = None, *, finished: bool = True
) -> dict[str, QueueOverview]:
    """Every queue that has tasks, by name: its counts per state and the age of its oldest
    due task. `finished=False` leaves the finished states out (their counts stay 0): the
    unfinished ones are read through the partial indexes, so the cost follows the backlog,
    not the history (what a metrics scrape wants)."""
    now = now or utcnow()
    due = sa.case((sa.and_(t.c.status.in_(CLAIMABLE), t.c.scheduled_at <= now), t.c.scheduled_at))
    grouped = sa.select(t.c.queue, t.c.status, sa.func.count(), sa.func.min(due)).group_by(
        t.c.queue, t.c.status
    )
    # Each of these carries a partial index's WHERE word for word, so SQLite reads that index.
    parts = (
        [grouped]
        if finished
        else [grouped.where(sa.text(w)) for w in (CLAIMABLE_WHERE, RUNNING_WHERE)]
    )
    found: dict[str, tuple[dict[TaskStatus, int], list[datetime]]] = {}
    for statement in parts:
        for queue, status, count, oldest in conn.execute(statement):
            counts, dues = found.setdefault(queue, (dict.fromkeys(TaskStatus, 0), []))
            counts[TaskStatus(status)] = count
            if oldest is not None:
                dues.append(oldest)
    return {
        queue: QueueOverview(counts, max((now - min(dues)).total_seconds(), 0.0) if dues else None)
        for queue, (counts, dues) in sorted(found.items())
    }


def task_stats(conn: Connection, *, now: datetime | None = None) -> QueueStats:
    """Counts per state and per queue, and how long the oldest due task has waited."""
    overview = queue_overview(conn, now)
    counts = dict.fromkeys(TaskStatus, 0)
    for queue in overview.values():
        for state, count in queue.counts.items():
            counts[state] += count
    ages = [q.oldest_due_seconds for q in overview.values() if q.oldest_due_seconds is not None]
    return QueueStats(
        counts,
        {name: queue.counts for name, queue in overview.items()},
        max(ages) if ages else None,
    )
