"""The hot statements use the indexes meant for them, however much history the table holds.

SQLite's plans come from `EXPLAIN QUERY PLAN`, PostgreSQL's from `EXPLAIN` on the table's
statistics (`ANALYZE`d: PostgreSQL's planner, unlike SQLite's, weighs what the table holds).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from store import leases, outcomes
from store.attempts import list_attempts
from store.driver import Driver
from store.engine import Database
from store.models import TERMINAL, TaskStatus
from store.outcomes import Outcome
from store.ratelimits import RateLimit, claim_limited
from store.retention import prune_finished
from store.stats import queue_overview
from store.tasks import NewTask, enqueue_many, list_tasks, unique_key_holder
from store.timeutil import utcnow

# How each engine asks for a plan, and how its plan says that it sorts.
EXPLAIN = {"sqlite": "EXPLAIN QUERY PLAN", "postgresql": "EXPLAIN"}
SORT = {"sqlite": "TEMP B-TREE", "postgresql": "Sort"}


def _explain(db: Database, statement: str, parameters: Any) -> str:
    """The plan of one statement, a line of it per step, joined by " | "."""
    with db.read() as conn:
        rows = conn.exec_driver_sql(f"{EXPLAIN[db.dialect]} {statement}", parameters).all()
    # SQLite: (id, parent, notused, detail); PostgreSQL: one line of text a row.
    return " | ".join(str(row[-1]) for row in rows)


@contextmanager
def _plans(db: Database) -> Iterator[list[str]]:
    """The query plan of every statement run inside the block, as the database would run it."""
    executed: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        executed.append((statement, parameters))

    plans: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", capture)
    try:
        yield plans
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", capture)
    for statement, parameters in executed:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "WITH")):
            plans.append(_explain(db, statement, parameters))


@pytest.fixture
def history(db: Database) -> Database:
    """A table with finished history and a backlog, as the planner would meet it."""
    now = utcnow()
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="x", priority=i % 3) for i in range(3000)], now=now)
        conn.exec_driver_sql(
            "UPDATE task SET finished_at = created_at,"
            " status = CASE priority WHEN 0 THEN 'failed' ELSE 'succeeded' END"
            " WHERE priority != 2"
        )
    if db.dialect == "postgresql":
        with db.write() as conn:
            conn.exec_driver_sql("ANALYZE task")
    return db


def _claim_plan(db: Database, *, by_queue: bool) -> str:
    # The claim goes to the driver directly (no SQLAlchemy event sees it): explain its text,
    # at a time when the backlog is due (PostgreSQL's plan depends on how much is).
    with db.read() as conn:
        driver = Driver(conn)
        statement = driver.sql(leases.claim_statement(db.dialect, by_queue=by_queue))
        now = driver.stamp(utcnow())
    params = ["w", now, now, now, *(["default"] if by_queue else []), 5]
    if db.dialect == "postgresql":  # its claim writes the attempt rows too
        params += [now, "w"]
    return _explain(db, statement, tuple(params))


def test_the_claim_reads_the_claimable_index_in_order_without_sorting(history: Database) -> None:
    with history.write() as conn:
        assert len(leases.claim_due(conn, "w", 5, lease_seconds=30)) == 5
    claim = _claim_plan(history, by_queue=False)
    assert "ix_task_claimable" in claim
    assert "ix_task_claimable_queue" not in claim
    assert SORT[history.dialect] not in claim


def test_the_claim_of_one_queue_reads_that_queues_index_in_order(history: Database) -> None:
    claim = _claim_plan(history, by_queue=True)
    assert "ix_task_claimable_queue" in claim
    assert SORT[history.dialect] not in claim


def test_the_reclaim_reads_the_lease_expiry_index(history: Database) -> None:
    with _plans(history) as plans, history.write() as conn:
        leases.reclaim_expired(conn, lambda task: None)
    assert "ix_task_lease_expiry" in plans[0]


@pytest.mark.parametrize("status", [TaskStatus.SUCCEEDED, TaskStatus.FAILED])
def test_listing_a_terminal_state_reads_the_finished_index(
    history: Database, status: TaskStatus
) -> None:
    with _plans(history) as plans, history.read() as conn:
        list_tasks(conn, status=status, limit=10)
    if history.dialect == "sqlite":
        assert "ix_task_finished_status" in plans[0]
    else:  # which index reads newest first is the planner's to weigh, by the state's share
        assert "Index Scan Backward" in plans[0]
    assert SORT[history.dialect] not in plans[0]


@pytest.mark.parametrize("status", TERMINAL)
def test_pruning_reads_the_prune_index_in_age_order_without_sorting(
    history: Database, status: TaskStatus
) -> None:
    with _plans(history) as plans, history.write() as conn:
        prune_finished(conn, status, utcnow() + timedelta(hours=1), limit=10)
    assert "ix_task_prune" in plans[0]
    assert SORT[history.dialect] not in plans[0]


def test_the_holder_of_a_unique_key_is_read_from_the_partial_unique_index(
    history: Database,
) -> None:
    with history.write() as conn:
        enqueue_many(conn, [NewTask(name="x", unique_key=f"k{i}") for i in range(500)])
        if history.dialect == "postgresql":
            conn.exec_driver_sql("ANALYZE task")
    with _plans(history) as plans, history.read() as conn:
        assert unique_key_holder(conn, "k7") is not None
    assert "uq_task_unique_key_active" in plans[0]


def test_claim_due_is_unchanged_by_a_future_backlog(history: Database) -> None:
    later = utcnow() + timedelta(hours=1)
    with history.write() as conn:
        enqueue_many(conn, [NewTask(name="later", scheduled_at=later) for _ in range(50)])
        claimed = leases.claim_due(conn, "w", 2000, lease_seconds=30)
    assert {task.name for task in claimed} == {"x"}
    assert len(claimed) == 1000


def _attempt_plans(plans: list[str]) -> list[str]:
    return [plan for plan in plans if " attempt " in f"{plan} "]


@pytest.mark.sqlite_only(
    reason="SQLite's plan text; PostgreSQL's planner rightly reads attempt whole at this size"
)
def test_every_statement_on_attempts_reads_their_index_by_task_creation_time(
    history: Database,
) -> None:
    # New attempts land at the end of ix_attempt_task only if it leads with the task's
    # creation time; each lookup must then name that time too, or it scans every attempt.
    with history.write() as conn:
        done, failed, released, kept = leases.claim_due(conn, "w", 4, lease_seconds=30)
    with _plans(history) as plans:
        with history.write() as conn:
            outcomes.record(conn, [Outcome(failed.lease, failed.attempts, utcnow(), error="E: x")])
            leases.release(conn, [released.lease])
        with history.read() as conn:
            list_attempts(conn, kept.id)
        with history.write() as conn:
            prune_finished(conn, TaskStatus.SUCCEEDED, utcnow() + timedelta(hours=1), limit=10)
    # Successes go to the driver in one executemany, unseen by SQLAlchemy's events.
    successes = [
        _explain(history, outcomes.SUCCEEDED_BY_ID[1], ("t", done.id, done.id, 1)),
        _explain(history, outcomes.SUCCEEDED_BY_ROW[1], ("t", done.row, done.id, done.id, 1)),
    ]
    on_attempts = [*_attempt_plans(plans), *successes]
    assert len(on_attempts) == 7, on_attempts
    for plan in on_attempts:
        assert "INDEX ix_attempt_task (task_created_at=? AND task_id=?" in plan, plan
        assert "SCAN attempt" not in plan, plan


@pytest.mark.sqlite_only(reason="rowids are SQLite's")
def test_a_success_finds_its_task_by_rowid_when_the_claim_gave_one(history: Database) -> None:
    # Ids are random: at a million tasks each lookup by id reads a page of the id index that
    # no other task shares. The claim's rowid goes straight to the row.
    with history.write() as conn:
        (claim,) = leases.claim_due(conn, "w", 1, lease_seconds=30)
    assert claim.row is not None
    params = ("t", "null", claim.row, claim.id, claim.lease_token, "t")
    by_row = _explain(history, outcomes.SUCCEEDED_BY_ROW[0], params)
    assert "USING INTEGER PRIMARY KEY (rowid=?)" in by_row, by_row
    by_id = _explain(history, outcomes.SUCCEEDED_BY_ID[0], ("t", "null", *params[3:]))
    assert "sqlite_autoindex_task_1 (id=?)" in by_id, by_id


@pytest.mark.sqlite_only(reason="EXPLAIN QUERY PLAN's wording; PostgreSQL plans by its statistics")
def test_the_metrics_overview_reads_the_partial_indexes_not_the_history(
    history: Database,
) -> None:
    with history.write() as conn:
        leases.claim_due(conn, "w", 5, lease_seconds=30)
    with _plans(history) as plans, history.read() as conn:
        queue_overview(conn, finished=False)
    names, claimable, waiting, running = plans
    assert "ix_task_queue_created (queue>?)" in names
    assert "SCAN task USING INDEX ix_task_claimable" in claimable
    assert "SCAN task USING INDEX ix_task_waiting" in waiting
    assert "SCAN task USING INDEX ix_task_lease_expiry" in running


def test_the_claim_that_leaves_out_limited_queues_reads_the_claimable_index(
    history: Database,
) -> None:
    with history.read() as conn:
        driver = Driver(conn)
        statement = driver.sql(leases.claim_statement(history.dialect, by_queue=False, excluded=2))
        now = driver.stamp(utcnow())
    params = ["w", now, now, now, "email", "sms", 5]
    if history.dialect == "postgresql":
        params += [now, "w"]
    claim = _explain(history, statement, tuple(params))
    assert "ix_task_claimable" in claim
    assert "ix_task_claimable_queue" not in claim
    assert SORT[history.dialect] not in claim


def test_a_limited_claim_probes_the_queues_index_and_counts_by_the_start_index(
    history: Database,
) -> None:
    with history.write() as conn:
        enqueue_many(conn, [NewTask(name="x", queue="email") for _ in range(3)])
    with _plans(history) as plans, history.write() as conn:
        claimed = claim_limited(
            conn, "w", 5, queue="email", rate=RateLimit(2, timedelta(minutes=1)), lease_seconds=30
        )
    assert len(claimed.claims) == 2
    assert "ix_task_claimable_queue" in plans[0]  # is anything due?
    starts = [plan for plan in plans if "queue_start" in plan]
    assert len(starts) == 3  # the prune, the count, the reopening's start
    if history.dialect == "sqlite":  # PostgreSQL scans a table this small whatever its indexes
        assert all("ix_queue_start" in plan for plan in starts)
    assert all(SORT[history.dialect] not in plan for plan in starts)
