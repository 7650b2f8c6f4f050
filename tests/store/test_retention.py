"""Pruning removes exactly the finished tasks past their age, with their attempts, in batches."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from store.control import retry_task
from store.engine import Database
from store.models import TERMINAL, TaskStatus, attempt_table
from store.retention import prune_finished
from store.tasks import get_tasks
from tests.support.states import finished, unfinished

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TICK = timedelta(microseconds=1)
LONG_AGO = T - timedelta(days=3650)


def remaining(db: Database, ids: list[str]) -> set[str]:
    with db.read() as conn:
        return {task.id for task in get_tasks(conn, ids)}


def attempts_of(db: Database) -> dict[str, int]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(attempt_table.c.task_id, sa.func.count()).group_by(attempt_table.c.task_id)
        )
        return {task_id: count for task_id, count in rows}


def prune(db: Database, status: TaskStatus, before: datetime, limit: int = 500) -> int:
    with db.write() as conn:
        return prune_finished(conn, status, before, limit=limit)


@pytest.mark.parametrize("status", TERMINAL)
def test_prunes_exactly_the_tasks_that_finished_before_the_cutoff(
    db: Database, status: TaskStatus
) -> None:
    cutoff = T - timedelta(days=7)
    old = [finished(db, status, LONG_AGO), finished(db, status, cutoff - TICK)]
    young = [
        finished(db, status, cutoff),
        finished(db, status, cutoff + TICK),
        finished(db, status, T),
    ]

    assert prune(db, status, cutoff) == 2

    assert remaining(db, old + young) == set(young)
    assert prune(db, status, cutoff) == 0


@pytest.mark.parametrize("status", TERMINAL)
def test_pruning_one_state_leaves_the_other_finished_states_alone(
    db: Database, status: TaskStatus
) -> None:
    by_status = {other: finished(db, other, LONG_AGO) for other in TERMINAL}

    assert prune(db, status, T) == 1

    assert remaining(db, list(by_status.values())) == {
        task_id for other, task_id in by_status.items() if other is not status
    }


def test_waiting_and_running_tasks_are_never_pruned_whatever_their_age(db: Database) -> None:
    alive = [
        unfinished(db, status, LONG_AGO)
        for status in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING)
    ]
    # Failed long ago, then queued again by hand: its history is old, the task is not.
    again = finished(db, TaskStatus.FAILED, LONG_AGO)
    with db.write() as conn:
        retry_task(conn, again, now=LONG_AGO)
    alive.append(again)

    for status in TERMINAL:
        assert prune(db, status, T + timedelta(days=3650)) == 0

    assert remaining(db, alive) == set(alive)
    assert attempts_of(db) == dict.fromkeys(alive[1:], 1)


def test_a_state_that_is_not_finished_is_refused(db: Database) -> None:
    with pytest.raises(ValueError, match="queued"):
        prune(db, TaskStatus.QUEUED, T)


@pytest.fixture
def plain(db: Database) -> Iterator[Database]:
    """The test's database through a bare engine: on SQLite, foreign keys off, no cascade
    (PostgreSQL enforces them on every connection)."""
    bare = Database(sa.create_engine(db.engine.url))
    if db.dialect == "sqlite":
        with bare.read() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 0
    yield bare
    bare.dispose()


@pytest.mark.parametrize("connection", ["backstop", "plain"])
def test_the_attempts_of_pruned_tasks_go_with_them_and_the_others_stay(
    db: Database, plain: Database, connection: str
) -> None:
    cutoff = T - timedelta(days=1)
    old = finished(db, TaskStatus.FAILED, cutoff - timedelta(hours=1))
    young = finished(db, TaskStatus.FAILED, cutoff + timedelta(hours=1))
    running = unfinished(db, TaskStatus.RUNNING, LONG_AGO)
    assert attempts_of(db) == {old: 1, young: 1, running: 1}

    assert prune(db if connection == "backstop" else plain, TaskStatus.FAILED, cutoff) == 1

    assert attempts_of(db) == {young: 1, running: 1}


def test_a_batch_deletes_at_most_limit_tasks_oldest_first_and_repeated_calls_finish(
    db: Database,
) -> None:
    ids = [finished(db, TaskStatus.SUCCEEDED, LONG_AGO + timedelta(minutes=n)) for n in range(12)]
    keep = finished(db, TaskStatus.SUCCEEDED, T)

    assert prune(db, TaskStatus.SUCCEEDED, T, limit=5) == 5
    assert remaining(db, ids) == set(ids[5:])
    assert prune(db, TaskStatus.SUCCEEDED, T, limit=5) == 5
    assert prune(db, TaskStatus.SUCCEEDED, T, limit=5) == 2
    assert prune(db, TaskStatus.SUCCEEDED, T, limit=5) == 0

    assert remaining(db, [*ids, keep]) == {keep}
