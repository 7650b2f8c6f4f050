"""Copying a queue from SQLite into a PostgreSQL database of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

import store.copy
from store import migrate
from store.copy import CopyRefused, copy_database, copy_rows, count_rows
from store.engine import Database, temporary_database
from store.leases import claim_due, reclaim_expired
from store.models import (
    TaskStatus,
    attempt_table,
    queue_start_table,
    schedule_table,
    task_table,
)
from store.tasks import NewTask, enqueue
from tests.support.states import one_of_each

AT = datetime(2026, 5, 4, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
def target(server: str) -> Iterator[Database]:
    """An empty PostgreSQL database, not yet migrated."""
    with temporary_database(server, "copy") as url:
        database = Database.from_url(url)
        yield database
        database.dispose()


@pytest.fixture
def migrated(target: Database) -> Database:
    """The target, migrated to the newest revision."""
    migrate.upgrade(target)
    return target


def rows(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, in key order."""
    with db.read() as conn:
        return {
            table.name: [
                dict(row._mapping)
                for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
            ]
            for table in (task_table, attempt_table, schedule_table)
        }


def test_every_row_of_every_state_arrives_as_it_was(db: Database, migrated: Database) -> None:
    ids = one_of_each(db, AT)

    report = copy_database(db, migrated, batch_size=2, now=AT)

    before, after = rows(db), rows(migrated)
    assert after == before
    statuses = {row["id"]: row["status"] for row in after["task"]}
    assert {statuses[ids[state]] for state in ids} == {s.value for s in TaskStatus}
    assert len(after["attempt"]) == 5
    assert len(after["schedule"]) == 2
    assert report.source == report.target == count_rows_of(migrated)
    assert report.source["task"] == {
        "queued": 2,  # one due, one delayed
        "running": 1,
        "retrying": 1,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 1,
    }


def count_rows_of(db: Database) -> dict[str, dict[str, int]]:
    with db.read() as conn:
        return count_rows(conn)


def test_the_target_carries_on_where_the_source_stopped(db: Database, migrated: Database) -> None:
    ids = one_of_each(db, AT)
    copy_database(db, migrated, now=AT)

    with migrated.write() as conn:
        # The dead runner's task is reclaimed there, its attempt closed as lease_expired ...
        assert [task.id for task in reclaim_expired(conn, lambda _: AT, now=AT)] == [ids["running"]]
        # ... and new attempts draw ids past the copied ones.
        claimed = claim_due(conn, "w9", 10, lease_seconds=60, now=AT)
    assert ids["queued"] in {task.id for task in claimed}
    attempt_ids = [row["id"] for row in rows(migrated)["attempt"]]
    assert len(attempt_ids) == len(set(attempt_ids))


def test_counts_that_differ_commit_nothing(
    db: Database, migrated: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_of_each(db, AT)

    def lossy(source: Connection, target: Connection, *, batch_size: int) -> None:
        copy_rows(source, target, batch_size=batch_size)
        target.execute(sa.delete(schedule_table).where(schedule_table.c.name == "nightly"))

    monkeypatch.setattr(store.copy, "copy_rows", lossy)

    with pytest.raises(CopyRefused, match="counts differ after the copy"):
        copy_database(db, migrated, now=AT)
    assert rows(migrated) == {"task": [], "attempt": [], "schedule": []}


def test_a_runner_at_work_on_the_source_is_refused(db: Database, migrated: Database) -> None:
    one_of_each(db, AT)
    with db.write() as conn:
        enqueue(conn, NewTask(name="test.noop", queue="busy"), now=AT)
        claim_due(conn, "w1", 1, lease_seconds=30, queue="busy", now=AT)

    with pytest.raises(CopyRefused, match=r"1 running task\(s\) .* until 2026-05-04 12:00:30 UTC"):
        copy_database(db, migrated, now=AT + timedelta(seconds=1))
    assert rows(migrated)["task"] == []


def test_a_target_holding_tasks_is_refused(db: Database, migrated: Database) -> None:
    one_of_each(db, AT)
    with migrated.write() as conn:
        enqueue(conn, NewTask(name="test.noop"), now=AT)

    with pytest.raises(CopyRefused, match="already holds tasks"):
        copy_database(db, migrated, now=AT)
    assert len(rows(migrated)["task"]) == 1


def test_an_unmigrated_target_is_refused_with_the_command_to_run(
    db: Database, target: Database
) -> None:
    one_of_each(db, AT)
    with pytest.raises(CopyRefused, match=r"no Backstop schema: run .*backstop db upgrade"):
        copy_database(db, target, now=AT)
    with target.read() as conn:
        assert sa.inspect(conn).get_table_names() == []


def test_the_source_itself_is_refused(migrated: Database) -> None:
    same = Database.from_url(migrated.engine.url.render_as_string(hide_password=False))
    try:
        with pytest.raises(CopyRefused, match="is the source database itself"):
            copy_database(migrated, same, now=AT)
    finally:
        same.dispose()


@pytest.mark.sqlite_only(reason="PostgreSQL holds only times in a time column")
def test_a_time_that_is_not_one_is_refused_naming_its_row(db: Database, migrated: Database) -> None:
    """SQLite holds what a hand wrote; PostgreSQL's timestamptz takes no such value. The copy
    names the row and its column instead of the driver's line on an unnamed parameter."""
    one_of_each(db, AT)
    with db.write() as conn:
        task = enqueue(conn, NewTask(name="test.noop"), now=AT)
        conn.execute(
            sa.text("UPDATE task SET finished_at = 'garbage' WHERE id = :id"), {"id": task.id}
        )

    with pytest.raises(
        CopyRefused, match=f"task {task.id}: finished_at holds 'garbage', which is not a time"
    ):
        copy_database(db, migrated, now=AT)
    assert rows(migrated) == {"task": [], "attempt": [], "schedule": []}


def test_the_starts_a_rate_limit_counts_arrive_too(db: Database, migrated: Database) -> None:
    one_of_each(db, AT)
    starts = [AT - timedelta(seconds=n) for n in range(3)]
    with db.write() as conn:
        conn.execute(
            sa.insert(queue_start_table), [{"queue": "email", "started_at": at} for at in starts]
        )

    copy_database(db, migrated, batch_size=2, now=AT)

    with migrated.read() as conn:
        copied = conn.execute(
            sa.select(queue_start_table.c.queue, queue_start_table.c.started_at)
        ).all()
    assert sorted(copied) == sorted(("email", at) for at in starts)
