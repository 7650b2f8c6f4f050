"""The hot path's driver-level statements store exactly what the SQLAlchemy path stores."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from store.attempts import list_attempts
from store.control import cancel_task
from store.driver import Driver
from store.engine import Database
from store.leases import claim_due
from store.models import AttemptOutcome, Claim, Lease, TaskStatus
from store.outcomes import Outcome, mark_succeeded, record
from store.tasks import NewTask, enqueue_many, get_task

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
RESULTS: list[Any] = [None, 0, 1.5, "é ✓", [1, {"a": None}], {"nested": {"list": [True, False]}}]


def _claim_two(db: Database) -> tuple[Claim, Claim]:
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t"), NewTask(name="t")], now=T)
        first, second = claim_due(conn, "w", 2, lease_seconds=60, now=T)
    return first, second


def _raw(db: Database, table: str, key: str, value: str) -> list[tuple[Any, ...]]:
    """The rows as the driver hands them over (a textual statement's columns have no type)."""
    with db.read() as conn:
        statement = sa.text(f"SELECT * FROM {table} WHERE {key} = :value")
        rows = conn.execute(statement, {"value": value})
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("result", RESULTS)
def test_a_success_is_stored_byte_for_byte_as_the_sqlalchemy_path_stores_it(
    db: Database, result: Any
) -> None:
    """One task finished by `record` (driver statements), its twin by `mark_succeeded`."""
    fast, slow = _claim_two(db)
    done = T + timedelta(seconds=1, microseconds=0)  # no microseconds: still six digits stored
    with db.write() as conn:
        assert record(conn, [Outcome(fast.lease, fast.attempts, done, result=result)]) == [
            TaskStatus.SUCCEEDED
        ]
        assert mark_succeeded(conn, slow.lease, result, now=done) is not None

    fast_row, slow_row = _raw(db, "task", "id", fast.id)[0], _raw(db, "task", "id", slow.id)[0]
    assert fast_row[1:] == slow_row[1:]
    fast_attempt = _raw(db, "attempt", "task_id", fast.id)[0]
    slow_attempt = _raw(db, "attempt", "task_id", slow.id)[0]
    assert fast_attempt[2:] == slow_attempt[2:]
    with db.read() as conn:
        assert get_task(conn, fast.id).result == result


def test_a_claim_reads_back_what_the_sqlalchemy_path_reads(db: Database) -> None:
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t", args=[1, "é"], kwargs={"k": [None, 2.5]})], now=T)
        (claim,) = claim_due(conn, "w", 1, lease_seconds=60, now=T + timedelta(microseconds=7))
    with db.read() as conn:
        stored = get_task(conn, claim.id)
    assert (
        (claim.args, claim.kwargs) == (stored.args, stored.kwargs) == ([1, "é"], {"k": [None, 2.5]})
    )
    assert (claim.created_at, claim.scheduled_at) == (stored.created_at, stored.scheduled_at)
    assert (claim.started_at, claim.lease_expires_at) == (
        stored.started_at,
        stored.lease_expires_at,
    )
    with db.read() as conn:
        (attempt,) = list_attempts(conn, claim.id)
    assert (attempt.number, attempt.worker, attempt.started_at) == (1, "w", claim.started_at)
    assert (attempt.finished_at, attempt.outcome) == (None, None)


def test_a_batch_with_a_lost_lease_and_a_cancel_writes_each_as_alone(db: Database) -> None:
    """On SQLite the savepoint undoes the batch statement, and each success is written on
    its own; on PostgreSQL the batch statement writes only the leases it matches."""
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t") for _ in range(3)], now=T)
        held, lost, cancelled = claim_due(conn, "w", 3, lease_seconds=60, now=T)
        cancel_task(conn, cancelled.id, now=T)
    stale = Lease(lost.id, lost.lease_token - 1)
    done = T + timedelta(seconds=1)
    with db.write() as conn:
        states = record(
            conn,
            [
                Outcome(held.lease, held.attempts, done, result="ok"),
                Outcome(stale, lost.attempts, done, result="stale"),
                Outcome(cancelled.lease, cancelled.attempts, done, result="dropped"),
            ],
        )
    assert states == [TaskStatus.SUCCEEDED, None, TaskStatus.CANCELLED]
    with db.read() as conn:
        assert (get_task(conn, held.id).status, get_task(conn, held.id).result) == (
            TaskStatus.SUCCEEDED,
            "ok",
        )
        assert get_task(conn, lost.id).status is TaskStatus.RUNNING
        assert get_task(conn, cancelled.id).result is None
        assert [a.outcome for a in list_attempts(conn, held.id)] == [AttemptOutcome.SUCCEEDED]
        assert [a.outcome for a in list_attempts(conn, lost.id)] == [None]


@pytest.mark.sqlite_only(reason="rowids are SQLite's: a claim on PostgreSQL gives no row")
def test_a_lease_whose_row_is_another_tasks_never_writes_that_task(db: Database) -> None:
    # The rowid only finds the row faster; the id and the token still decide. (A rowid can
    # change under a VACUUM; the outcome is then written by id, one at a time.)
    first, second = _claim_two(db)
    assert None not in (first.row, second.row)
    assert first.row != second.row
    moved = replace(first.lease, row=second.row)
    with db.write() as conn:
        assert record(conn, [Outcome(moved, first.attempts, T + timedelta(seconds=1))]) == [
            TaskStatus.SUCCEEDED
        ]
    with db.read() as conn:
        assert get_task(conn, first.id).status is TaskStatus.SUCCEEDED
        assert get_task(conn, second.id).status is TaskStatus.RUNNING
        assert [a.outcome for a in list_attempts(conn, first.id)] == [AttemptOutcome.SUCCEEDED]
        assert [a.outcome for a in list_attempts(conn, second.id)] == [None]


def test_a_naive_datetime_is_refused_as_the_column_type_refuses_it(db: Database) -> None:
    with db.read() as conn, pytest.raises(ValueError, match="aware datetime"):
        Driver(conn).stamp(datetime(2026, 3, 1, 12, 0))


def test_the_drivers_errors_come_out_as_sqlalchemys_with_the_original_inside(
    db: Database,
) -> None:
    # One family of exceptions whichever path ran the statement: the runner tells a locked
    # or unreachable database (OperationalError) from a bad row by SQLAlchemy's classes.
    dbapi = db.engine.dialect.loaded_dbapi
    # A missing table is an OperationalError to sqlite3, a ProgrammingError to psycopg.
    unknown = sa.exc.OperationalError if db.dialect == "sqlite" else sa.exc.ProgrammingError
    with pytest.raises(unknown) as missing, db.write() as conn:
        Driver(conn).execute("SELECT * FROM no_such_table WHERE id = ?", ("x",))
    assert isinstance(missing.value.orig, dbapi.Error)
    stamp = "2026-03-01 12:00:00.000000"
    with pytest.raises(sa.exc.IntegrityError) as orphan, db.write() as conn:
        Driver(conn).execute_many(
            "INSERT INTO attempt (task_id, task_created_at, number, started_at, worker)"
            " VALUES (?, ?, ?, ?, ?)",
            [("no-such-task", stamp, 1, stamp, "w")],
        )
    assert isinstance(orphan.value.orig, dbapi.IntegrityError)
