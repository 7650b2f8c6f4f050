"""Rate limits: at most N starts of a queue's tasks in any period, counted by the database.

Each start of a task of a limited queue (first attempts and retries alike) leaves a row in
`queue_start`, written in the transaction of the claim that started it. The claim of a
limited queue counts the rows of the last period first and takes no more than the rest of
the allowance, so no window of `period` ever holds more than N starts, however many runners
claim. Rows that no window can count any more are pruned by the same claim: the table holds
about N rows per limited queue. Unlimited queues never touch it.

Two claims of one queue never count at once. On SQLite the claim's transaction holds the
database's write lock from its first statement. On PostgreSQL the claim first takes a
transaction-scoped advisory lock on the queue's name, in a statement of its own: the count
that follows is a new statement, and under READ COMMITTED it sees every start the previous
holder committed before it let go. Claims of several limited queues in one transaction take
their locks in the order of the names, so two runners cannot deadlock on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.leases import claim_due
from store.models import CLAIMABLE_WHERE, Claim, queue_start_table
from store.timeutil import UTCDateTime, utcnow

qs = queue_start_table

# The first key of the two-key advisory locks of queues ('BSTR'); the second is the hash of
# the queue's name. The two-key space is apart from the migration lock's one-key space.
_LOCK_SPACE = 0x42535452


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `starts` starts in any `period`."""

    starts: int
    period: timedelta

    def __str__(self) -> str:
        seconds = self.period.total_seconds()
        for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
            if seconds >= size and (seconds / size).is_integer():
                return f"{self.starts}/{int(seconds // size)}{unit}"
        return f"{self.starts}/{seconds * 1000:g}ms"


@dataclass(frozen=True, slots=True)
class LimitedClaim:
    """What the claim of a limited queue took, and, when it used up the allowance, the
    moment the next start is allowed (None: the allowance was not used up)."""

    claims: list[Claim]
    reopens_at: datetime | None


@dataclass(frozen=True, slots=True)
class QueueUse:
    """A limited queue right now: its limit, the starts its window holds, and when the
    next start is allowed if the window is full (None: it is not)."""

    limit: RateLimit
    started: int
    reopens_at: datetime | None


def lock_queue(conn: Connection, queue: str) -> None:
    """Wait for the queue's claim lock, held until the transaction ends (PostgreSQL; on
    SQLite the write transaction already excludes every other claim)."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(:space, hashtext(:queue))"),
            {"space": _LOCK_SPACE, "queue": queue},
        )


def claim_limited(
    conn: Connection,
    owner: str,
    limit: int,
    *,
    queue: str,
    rate: RateLimit,
    lease_seconds: float,
    now: datetime | None = None,
) -> LimitedClaim:
    """Claim up to `limit` due tasks of `queue`, no more than `rate` allows as of `now`.

    Run in the write transaction the claim commits with: the starts it records and the
    tasks it claims stand or fall together. Without `now` the clock is read once the
    queue's lock is held, so the starts of successive holders are in order.
    """
    # Nothing due, nothing to count: an idle limited queue costs one index probe, and its
    # lock is not taken (on PostgreSQL the lock is held to the end of the transaction).
    if not _has_due(conn, queue, now or utcnow()):
        return LimitedClaim([], None)
    lock_queue(conn, queue)
    now = now or utcnow()
    cut = now - rate.period
    conn.execute(
        sa.delete(qs).where(
            qs.c.queue == queue,
            sa.or_(qs.c.started_at <= cut, qs.c.started_at > cut + 2 * rate.period),
        )
    )
    started = _count(conn, queue, cut, rate)
    allowed = min(limit, rate.starts - started)
    if allowed <= 0:
        return LimitedClaim([], _reopens(conn, queue, cut, started, rate))
    claims = claim_due(conn, owner, allowed, lease_seconds=lease_seconds, queue=queue, now=now)
    if claims:
        conn.execute(sa.insert(qs), [{"queue": queue, "started_at": now} for _ in claims])
    started += len(claims)
    reopens = _reopens(conn, queue, cut, started, rate) if started >= rate.starts else None
    return LimitedClaim(claims, reopens)


def queue_use(
    conn: Connection, limits: Mapping[str, RateLimit], now: datetime | None = None
) -> dict[str, QueueUse]:
    """How much of its allowance each limited queue has used as of `now` (a read)."""
    now = now or utcnow()
    used: dict[str, QueueUse] = {}
    for queue, rate in sorted(limits.items()):
        cut = now - rate.period
        started = _count(conn, queue, cut, rate)
        full = started >= rate.starts
        used[queue] = QueueUse(
            rate, started, _reopens(conn, queue, cut, started, rate) if full else None
        )
    return used


# Word for word the partial index's WHERE, so that SQLite reads `ix_task_claimable_queue`.
_DUE = sa.text(
    f"SELECT 1 FROM task WHERE {CLAIMABLE_WHERE} AND queue = :queue AND scheduled_at <= :now"
    " LIMIT 1"
).bindparams(sa.bindparam("now", type_=UTCDateTime()))


def _has_due(conn: Connection, queue: str, now: datetime) -> bool:
    """Whether a task of `queue` is due as of `now`."""
    return conn.execute(_DUE, {"queue": queue, "now": now}).first() is not None


def _in_window(queue: str, cut: datetime, rate: RateLimit) -> sa.ColumnElement[bool]:
    """The starts of `queue` in the window after `cut`. Bounded above too, at a period past
    now: a later start (written by hand, by a clock far off, or on SQLite a value that is
    not a time, which compares as text after every time) would otherwise fill every window
    and never leave one. The claim prunes such starts with the old ones."""
    return sa.and_(
        qs.c.queue == queue, qs.c.started_at > cut, qs.c.started_at <= cut + 2 * rate.period
    )


def _count(conn: Connection, queue: str, cut: datetime, rate: RateLimit) -> int:
    """The starts of `queue` in the window after `cut`."""
    count: int = conn.execute(
        sa.select(sa.func.count()).where(_in_window(queue, cut, rate))
    ).scalar_one()
    return count


def _reopens(
    conn: Connection, queue: str, cut: datetime, started: int, rate: RateLimit
) -> datetime | None:
    """When a window holding `started` starts after `cut` has room again: the start that
    must leave it first, plus the period."""
    first: datetime | None = conn.execute(
        sa.select(qs.c.started_at)
        .where(_in_window(queue, cut, rate))
        .order_by(qs.c.started_at)
        .offset(started - rate.starts)
        .limit(1)
    ).scalar_one_or_none()
    return None if first is None else first + rate.period
