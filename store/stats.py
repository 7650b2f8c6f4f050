"""What the queue looks like: counts per state and queue, how late the oldest work is, and
how much finished lately. The dashboard and `backstop top` show `overview`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import CLAIMABLE_WHERE, TERMINAL_WHERE, TaskStatus, task_table
from store.runners import RunnerSeen, recent_runners
from store.timeutil import utcnow

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
    """One queue: its counts by state and how long its oldest due task has waited."""

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


def _counts_by_queue(conn: Connection) -> dict[str, dict[TaskStatus, int]]:
    queues: dict[str, dict[TaskStatus, int]] = {}
    grouped = sa.select(t.c.queue, t.c.status, sa.func.count()).group_by(t.c.queue, t.c.status)
    for queue, status, count in conn.execute(grouped):
        queues.setdefault(queue, dict.fromkeys(TaskStatus, 0))[TaskStatus(status)] = count
    return dict(sorted(queues.items()))


def _age(oldest: datetime | None, now: datetime) -> float | None:
    return None if oldest is None else max((now - oldest).total_seconds(), 0.0)


def task_stats(conn: Connection, *, now: datetime | None = None) -> QueueStats:
    """Counts per state and per queue, and how long the oldest due task has waited."""
    now = now or utcnow()
    queues = _counts_by_queue(conn)
    counts = dict.fromkeys(TaskStatus, 0)
    for per_state in queues.values():
        for state, count in per_state.items():
            counts[state] += count
    oldest = conn.execute(
        sa.select(sa.func.min(t.c.scheduled_at)).where(
            sa.text(CLAIMABLE_WHERE), t.c.scheduled_at <= now
        )
    ).scalar_one_or_none()
    return QueueStats(counts, queues, _age(oldest, now))


def oldest_due_by_queue(conn: Connection, *, now: datetime | None = None) -> dict[str, float]:
    """Per queue with due work, how long its oldest due (queued or retrying) task has waited."""
    now = now or utcnow()
    query = (
        sa.select(t.c.queue, sa.func.min(t.c.scheduled_at))
        .where(sa.text(CLAIMABLE_WHERE), t.c.scheduled_at <= now)
        .group_by(t.c.queue)
    )
    return {queue: _age(oldest, now) or 0.0 for queue, oldest in conn.execute(query)}


def queue_overview(conn: Connection, *, now: datetime | None = None) -> list[QueueOverview]:
    """Every queue by name, with its counts by state and the age of its oldest due task."""
    now = now or utcnow()
    ages = oldest_due_by_queue(conn, now=now)
    return [
        QueueOverview(name, counts, ages.get(name))
        for name, counts in _counts_by_queue(conn).items()
    ]


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
    queues = queue_overview(conn, now=now)
    counts = dict.fromkeys(TaskStatus, 0)
    for queue in queues:
        for state, count in queue.counts.items():
            counts[state] += count
    ages = [q.oldest_due_seconds for q in queues if q.oldest_due_seconds is not None]
    stats = QueueStats(counts, {q.name: q.counts for q in queues}, max(ages) if ages else None)
    return Overview(now, stats, queues, throughput(conn, now=now), recent_runners(conn, now=now))
