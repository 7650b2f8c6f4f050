"""The runners at work: seen in the leases of running tasks and in the latest attempts.

Runners keep no table of their own. One that holds a lease is alive (it renews the lease
while the task runs); one that started or finished an attempt lately was alive then.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import RUNNING_WHERE, attempt_table, task_table
from store.timeutil import utcnow

a = attempt_table
t = task_table

# How far back a runner counts as seen.
RECENT = timedelta(minutes=5)
# The latest attempts read: a bounded read of the attempt table's primary key, however long
# its history (the attempt table has no index on times).
LATEST_ATTEMPTS = 2000


@dataclass(frozen=True, slots=True)
class RunnerSeen:
    """A runner (its worker id, `host:pid:random`), the tasks it runs now, and when an
    attempt of its last started or finished (None: it holds leases, with no recent attempt)."""

    worker: str
    busy: int
    last_seen: datetime | None


def recent_runners(
    conn: Connection, *, now: datetime | None = None, within: timedelta = RECENT
) -> list[RunnerSeen]:
    """The runners that hold a lease or ran an attempt within `within` of `now`, by id."""
    now = now or utcnow()
    busy: dict[str, int] = dict(
        conn.execute(
            sa.select(t.c.lease_owner, sa.func.count())
            .where(sa.text(RUNNING_WHERE), t.c.lease_owner.is_not(None))
            .group_by(t.c.lease_owner)
        ).all()
    )
    latest = (
        sa.select(a.c.worker, sa.func.coalesce(a.c.finished_at, a.c.started_at).label("seen"))
        .order_by(a.c.id.desc())
        .limit(LATEST_ATTEMPTS)
        .subquery()
    )
    seen: dict[str, datetime] = dict(
        conn.execute(
            sa.select(latest.c.worker, sa.func.max(latest.c.seen))
            .where(latest.c.seen >= now - within)
            .group_by(latest.c.worker)
        ).all()
    )
    return [
        RunnerSeen(worker, busy.get(worker, 0), seen.get(worker))
        for worker in sorted(busy.keys() | seen.keys())
    ]
