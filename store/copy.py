"""Copying a whole queue (tasks, attempts, schedules) from one database to another, as a team
moves from SQLite to PostgreSQL.

The source is read in one read transaction, so the copy is a single consistent snapshot; the
target is written in one transaction, counted inside it and committed only when every count
matches the source's: a failed copy leaves the target as empty as it found it, ready for
another try. Rows are read and written in batches, in key order, so memory stays flat
however long the history.

Every column is copied as it is, leases included. A copy runs only while no runner holds a
live lease on the source, so a `running` task found there belongs to a runner that died: its
lease has expired, and the target's runners reclaim it exactly as the source's would have
(one more expiration, an attempt that ends `lease_expired`). Clearing the lease instead would
hide that crash from the task's history.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store import migrate
from store.engine import Database, same_database
from store.errors import StoreError
from store.models import (
    TaskStatus,
    attempt_table,
    dependency_table,
    queue_start_table,
    schedule_table,
    task_table,
)
from store.timeutil import UnreadableTime, stored_text, utcnow

t, a, s, d = task_table, attempt_table, schedule_table, dependency_table

BATCH_SIZE = 1_000

# A table's rows in the count of one state: attempts still running have no outcome.
RUNNING_ATTEMPT = "running"

Counts = dict[str, dict[str, int]]
"""Rows per table, then per state (a task's status, an attempt's outcome; `all` for schedules)."""


class CopyRefused(StoreError):
    """A copy that must not start (active runners, a target not ready) or did not verify."""


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What a copy found on the source and, counted apart inside its transaction, on the target."""

    source: Counts
    target: Counts


@dataclass(frozen=True, slots=True)
class ActiveLeases:
    """The running tasks whose lease has not expired: a runner is at work on them."""

    count: int
    until: datetime | None


def active_leases(conn: Connection, *, now: datetime | None = None) -> ActiveLeases:
    """How many tasks a live runner holds, and when the last of their leases expires."""
    now = now or utcnow()
    row = conn.execute(
        sa.select(sa.func.count(), sa.func.max(t.c.lease_expires_at)).where(
            t.c.status == TaskStatus.RUNNING.value, t.c.lease_expires_at > now
        )
    ).one()
    return ActiveLeases(row[0], row[1])


def count_rows(conn: Connection) -> Counts:
    """Rows per table and per state, every state named (zero when none is in it)."""
    tasks = {status.value: 0 for status in TaskStatus}
    for status, n in conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)):
        tasks[status] = n
    attempts: dict[str, int] = {}
    for outcome, n in conn.execute(sa.select(a.c.outcome, sa.func.count()).group_by(a.c.outcome)):
        attempts[outcome or RUNNING_ATTEMPT] = n
    schedules = conn.execute(sa.select(sa.func.count()).select_from(s)).scalar_one()
    return {
        "task": tasks,
        "attempt": dict(sorted(attempts.items())),
        "schedule": {"all": schedules},
    }


def has_tasks(conn: Connection) -> bool:
    """Whether the database holds any task."""
    return conn.execute(sa.select(t.c.id).limit(1)).first() is not None


def _batches(
    conn: Connection, table: sa.Table, keys: list[sa.Column[Any]], batch_size: int
) -> Iterator[list[dict[str, Any]]]:
    """Every row of `table`, in batches, by keyset on `keys` (unique together)."""
    after: tuple[Any, ...] | None = None
    while True:
        query = sa.select(table).order_by(*keys).limit(batch_size)
        if after is not None:
            query = query.where(sa.tuple_(*keys) > sa.tuple_(*after))
        rows = [dict(row._mapping) for row in conn.execute(query)]
        if not rows:
            return
        yield rows
        after = tuple(rows[-1][key.name] for key in keys)


def copy_rows(source: Connection, target: Connection, *, batch_size: int = BATCH_SIZE) -> None:
    """Insert every task, attempt, schedule and `after=` link of `source` into `target`,
    every column as is, and the starts that rate limits count."""
    # Tasks before attempts and links: they refer to tasks.
    for table, keys in (
        (t, [t.c.created_at, t.c.id]),
        (a, [a.c.id]),
        (s, [s.c.name]),
        (d, [d.c.child_id, d.c.parent_id]),
    ):
        for rows in _batches(source, table, keys, batch_size):
            _refuse_unreadable_times(table, keys[-1].name, rows)
            target.execute(sa.insert(table), rows)
    # The starts that rate-limited queues' windows still count, or the first window after
    # the move would let a limit's worth more through. Their ids are the target's own; a
    # start that is not a time counts in no window, and is left behind.
    for rows in _batches(source, queue_start_table, [queue_start_table.c.id], batch_size):
        starts = [
            {"queue": row["queue"], "started_at": row["started_at"]}
            for row in rows
            if not isinstance(row["started_at"], UnreadableTime)
        ]
        if starts:
            target.execute(sa.insert(queue_start_table), starts)
    if target.dialect.name == "postgresql":
        # Attempt ids were copied, not drawn from the sequence: move it past them, or the
        # first attempt written on the target would collide with a copied one.
        target.execute(
            sa.text(
                "SELECT setval(pg_get_serial_sequence('attempt', 'id'),"
                " COALESCE((SELECT max(id) FROM attempt), 0) + 1, false)"
            )
        )


def _refuse_unreadable_times(table: sa.Table, key: str, rows: list[dict[str, Any]]) -> None:
    """Refuse a row with a time that is not one (SQLite holds what a hand wrote there):
    PostgreSQL would refuse it too, in a line naming neither the row nor the column."""
    for row in rows:
        for column, value in row.items():
            if isinstance(value, UnreadableTime):
                raise CopyRefused(
                    f"{table.name} {row[key]}: {column} holds {stored_text(value.stored)!r},"
                    " which is not a time; correct or delete the row on the source first"
                )


def _refuse_target(conn: Connection, where: str) -> None:
    current, head = migrate.current_revision(conn), migrate.head_revision()
    if current is None:
        raise CopyRefused(
            f"the target {where} has no Backstop schema: "
            f"run 'BACKSTOP_DATABASE_URL=<url> backstop db upgrade' for it first"
        )
    if current != head:
        raise CopyRefused(
            f"the target {where} is at migration {current}, not this Backstop's {head}: "
            f"run 'BACKSTOP_DATABASE_URL=<url> backstop db upgrade' for it first"
        )
    if has_tasks(conn):
        raise CopyRefused(f"the target {where} already holds tasks: copy into an empty queue")


def copy_database(
    source: Database,
    target: Database,
    *,
    batch_size: int = BATCH_SIZE,
    now: datetime | None = None,
) -> CopyReport:
    """Copy the queue of `source` into `target`, which must be migrated and hold no task;
    the counts on both sides, equal, once the copy is committed.

    Refused (`CopyRefused`) when both name one database, while a runner holds a live lease
    on the source, and when the counts on the target do not match (nothing is committed).
    """
    where = target.engine.url.render_as_string(hide_password=True)
    if same_database(source.engine.url, target.engine.url):
        raise CopyRefused(f"the target {where} is the source database itself")
    with source.read() as reading:
        if migrate.current_revision(reading) != migrate.head_revision():
            raise CopyRefused("the source database is not at this Backstop's newest migration")
        active = active_leases(reading, now=now)
        if active.count:
            raise CopyRefused(
                f"{active.count} running task(s) on the source hold a lease until "
                f"{active.until:%Y-%m-%d %H:%M:%S} UTC: stop the API and the workers first"
            )
        expected = count_rows(reading)
        with target.write() as writing:
            _refuse_target(writing, where)
            copy_rows(reading, writing, batch_size=batch_size)
            copied = count_rows(writing)
            if copied != expected:
                # Raising rolls the target back: it stays empty.
                raise CopyRefused(
                    f"counts differ after the copy: source {expected}, target {copied}"
                )
    return CopyReport(expected, copied)
