"""What the queue looks like: counts per state and queue, how late the oldest work is, and
how much finished lately. The dashboard and `backstop top` show `overview`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import (
    CLAIMABLE,
    CLAIMABLE_WHERE,
    RUNNING_WHERE,
    TERMINAL_WHERE,
    WAITING_WHERE,
    TaskStatus,
    task_table,
)
from store.runners import RunnerSeen, recent_runners
from store.timeutil import UnreadableTime, utcnow

t = task_table

# What the throughput chart counts, a minute at a time.
THROUGHPUT_MINUTES = 15
FINISHED = (TaskStatus.SUCCEEDED, TaskStatus.FAILED)


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

    name: str
    counts: dict[TaskStatus, int]
    oldest_due_seconds: float | None


@dataclass(frozen=True, slots=True)
class Minute:
    """The tasks that finished in one minute, by outcome; `start` is the minute's start."""

    start: datetime
    succeeded: int
    failed: int


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything an operator's first look shows, read at `now`."""

    now: datetime
    stats: QueueStats
    queues: list[QueueOverview]
    throughput: list[Minute]
    runners: list[RunnerSeen]


# Every queue name, in one index probe per queue rather than a scan of the history: each step
# asks `ix_task_queue_created` for the first name after the last one (a loose index scan,
# which neither SQLite nor PostgreSQL plans by itself for DISTINCT).
_QUEUE_NAMES = sa.text(
    "WITH RECURSIVE names(queue) AS ("
    " SELECT (SELECT min(queue) FROM task)"
    " UNION ALL"
    " SELECT (SELECT min(queue) FROM task WHERE queue > names.queue)"
    " FROM names WHERE names.queue IS NOT NULL)"
    " SELECT queue FROM names WHERE queue IS NOT NULL"
)


def queue_names(conn: Connection) -> list[str]:
    """The names of the queues that hold tasks, in order; cheap whatever the history."""
    return list(conn.execute(_QUEUE_NAMES).scalars())


def queue_overview(
    conn: Connection, now: datetime | None = None, *, finished: bool = True
) -> dict[str, QueueOverview]:
    """Every queue that has tasks, by name: its counts per state and the age of its oldest
    due task. `finished=False` leaves the finished states out (their counts stay 0): the
    unfinished ones are read through the partial indexes, so the cost follows the backlog
    and the number of queues, not the history (what a metrics scrape wants)."""
    now = now or utcnow()
    if finished:
        parts = [_grouped(t, now)]
    else:
        # Each WHERE is a partial index's word for word; materialized, so that SQLite reads
        # that index rather than walk `ix_task_queue_created` (all history) for the GROUP BY.
        parts = [
            _grouped(
                sa.select(t.c.queue, t.c.status, t.c.scheduled_at, t.c.waiting_on)
                .where(sa.text(where))
                .cte(name)
                .prefix_with("MATERIALIZED"),
                now,
            )
            for name, where in (
                ("claimable", CLAIMABLE_WHERE),
                ("waiting", WAITING_WHERE),  # queued, waiting on parents (`after=`)
                ("running", RUNNING_WHERE),
            )
        ]
    found: dict[str, tuple[dict[TaskStatus, int], list[datetime]]] = {}
    if not finished:  # a queue of finished tasks alone is still there, with zeros
        for queue in queue_names(conn):
            found[queue] = (dict.fromkeys(TaskStatus, 0), [])
    for statement in parts:
        for queue, status, count, oldest in conn.execute(statement):
            counts, dues = found.setdefault(queue, (dict.fromkeys(TaskStatus, 0), []))
            # A state or a due time written by hand that is not one is left out, not raised on.
            if status in counts:
                counts[TaskStatus(status)] += count  # queued: claimable and waiting both
            if oldest is not None and not isinstance(oldest, UnreadableTime):
                dues.append(oldest)
    return {
        queue: QueueOverview(
            queue, counts, max((now - min(dues)).total_seconds(), 0.0) if dues else None
        )
        for queue, (counts, dues) in sorted(found.items())
    }


def _grouped(rows: sa.FromClause, now: datetime) -> sa.Select[Any]:
    """Per queue and state of `rows`: how many, and the earliest due time of those due."""
    c = rows.c
    # A task waiting on its parents is not due, whatever its time.
    due = sa.case(
        (
            sa.and_(c.status.in_(CLAIMABLE), c.waiting_on == 0, c.scheduled_at <= now),
            c.scheduled_at,
        )
    )
    return sa.select(c.queue, c.status, sa.func.count(), sa.func.min(due)).group_by(
        c.queue, c.status
    )


def _age(oldest: datetime | None, now: datetime) -> float | None:
    return None if oldest is None else max((now - oldest).total_seconds(), 0.0)


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


def throughput(
    conn: Connection, *, now: datetime | None = None, minutes: int = THROUGHPUT_MINUTES
) -> list[Minute]:
    """The tasks that succeeded and failed in each of the last `minutes` minutes, oldest
    first; the last one is the minute `now` falls in, so far."""
    now = now or utcnow()
    current = now.replace(second=0, microsecond=0)
    starts = [current - timedelta(minutes=n) for n in range(minutes - 1, -1, -1)]
    # One pass over the finished tasks of the window, each given the number of its minute
    # (the latest start it is not before): no date function, which every dialect spells
    # differently.
    bucket = sa.case(
        *((t.c.finished_at >= start, n) for n, start in reversed(list(enumerate(starts)))),
        else_=-1,
    ).label("minute")
    query = (
        sa.select(bucket, t.c.status, sa.func.count())
        # The literal clause lets SQLite use the partial index on (status, finished_at).
        .where(
            sa.text(TERMINAL_WHERE),
            t.c.status.in_([state.value for state in FINISHED]),
            t.c.finished_at >= starts[0],
        )
        .group_by(bucket, t.c.status)
    )
    counts: dict[tuple[int, TaskStatus], int] = {}
    for minute, status, count in conn.execute(query):
        counts[(minute, TaskStatus(status))] = count
    return [
        Minute(
            start,
            counts.get((n, TaskStatus.SUCCEEDED), 0),
            counts.get((n, TaskStatus.FAILED), 0),
        )
        for n, start in enumerate(starts)
    ]


def overview(conn: Connection, *, now: datetime | None = None) -> Overview:
    """Queues with their counts and due work, throughput and recent runners, at `now`."""
    now = now or utcnow()
    queues = list(queue_overview(conn, now).values())
    counts = dict.fromkeys(TaskStatus, 0)
    for queue in queues:
        for state, count in queue.counts.items():
            counts[state] += count
    ages = [q.oldest_due_seconds for q in queues if q.oldest_due_seconds is not None]
    stats = QueueStats(counts, {q.name: q.counts for q in queues}, max(ages) if ages else None)
    return Overview(now, stats, queues, throughput(conn, now=now), recent_runners(conn, now=now))
