"""Values written by hand that are not of their column's type, on both engines: what SQLite
stores in a time column (any text, a number) and what PostgreSQL's `timestamptz` holds that
Python has no datetime for (`infinity`, a year past 9999), and a state outside the enum once
its CHECK is dropped. Every store read returns the row, with the value as an
`UnreadableTime` (or the stored state); the runner's statements claim, reclaim, prune and
count past it instead of failing on it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from store.attempts import list_attempts
from store.engine import Database
from store.leases import claim_due, reclaim_expired
from store.models import TaskStatus
from store.retention import prune_finished
from store.stats import task_stats
from store.tasks import count_by_status, get_task, list_tasks, next_due_at
from store.timeutil import UnreadableTime
from tests.support.states import finished, unfinished

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

# Per engine: values a time column may hold that are not a time Python can have, the last
# one sorting before every time (so that a task holding it in `scheduled_at`, say, is due).
NOT_TIMES: dict[str, list[Any]] = {
    "sqlite": ["garbage", "2026-13-45", 12345, ""],
    "postgresql": ["infinity", "10000-01-01 00:00:00+00", "-infinity"],
}


def not_times(db: Database) -> list[Any]:
    return NOT_TIMES[db.dialect]


def early(db: Database) -> Any:
    """A value that is not a time and sorts before every time."""
    return not_times(db)[-1]


def by_hand(db: Database, task_id: str, column: str, value: Any) -> None:
    """`UPDATE task SET <column> = value`, past the CHECKs (another program's write)."""
    with db.write() as conn:
        if db.dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        conn.execute(
            sa.text(f"UPDATE task SET {column} = :v WHERE id = :id"), {"v": value, "id": task_id}
        )
        if db.dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")


@pytest.fixture
def no_state_check(db: Database) -> Iterator[None]:
    """The state's CHECK dropped for the test (PostgreSQL; SQLite's writes above skip it),
    and put back after it: the server's database is shared by the session's tests."""
    if db.dialect == "sqlite":
        yield
        return
    with db.write() as conn:
        conn.exec_driver_sql("ALTER TABLE task DROP CONSTRAINT ck_task_status")
    yield
    states = ", ".join(f"'{state.value}'" for state in TaskStatus)
    with db.write() as conn:
        conn.exec_driver_sql(f"DELETE FROM task WHERE status NOT IN ({states})")
        conn.exec_driver_sql(
            f"ALTER TABLE task ADD CONSTRAINT ck_task_status CHECK (status IN ({states}))"
        )


@pytest.mark.parametrize("column", ["created_at", "scheduled_at", "started_at", "finished_at"])
def test_a_time_that_is_not_one_is_read_with_the_value_stored(db: Database, column: str) -> None:
    ids = [unfinished(db, TaskStatus.QUEUED, T + timedelta(seconds=n)) for n in range(6)]
    for task_id, value in zip(ids, not_times(db), strict=False):
        by_hand(db, task_id, column, value)

    with db.read() as conn:
        for task_id, value in zip(ids, not_times(db), strict=False):
            read = getattr(get_task(conn, task_id), column)
            assert isinstance(read, UnreadableTime)
            assert str(read.stored).startswith(str(value)[:5])
        # One page a task: the cursor goes past each of them, whatever its place.
        seen: list[str] = []
        cursor = None
        while True:
            page = list_tasks(conn, limit=1, cursor=cursor)
            seen += [task.id for task in page.items]
            if (cursor := page.next_cursor) is None:
                break
    assert sorted(seen) == sorted(ids)


def test_a_task_due_at_a_time_that_is_not_one_is_claimed_and_reclaimed(db: Database) -> None:
    task_id = unfinished(db, TaskStatus.QUEUED, T)
    by_hand(db, task_id, "scheduled_at", early(db))
    by_hand(db, task_id, "created_at", not_times(db)[0])

    with db.write() as conn:
        assert next_due_at(conn) is None or next_due_at(conn) <= T
        [claim] = claim_due(conn, "w", 10, lease_seconds=30, now=T)
    assert claim.id == task_id
    assert isinstance(claim.scheduled_at, UnreadableTime)
    by_hand(db, task_id, "lease_expires_at", early(db))
    with db.write() as conn:
        [reclaimed] = reclaim_expired(conn, lambda task: None, now=T)
    assert reclaimed.id == task_id
    assert reclaimed.status is TaskStatus.FAILED
    with db.read() as conn:
        assert [attempt.number for attempt in list_attempts(conn, task_id)] == [1]


def test_a_finished_task_with_times_that_are_not_times_is_pruned_with_its_attempts(
    db: Database,
) -> None:
    odd = finished(db, TaskStatus.SUCCEEDED, T - timedelta(days=30))
    kept = finished(db, TaskStatus.SUCCEEDED, T)
    by_hand(db, odd, "finished_at", early(db))

    with db.write() as conn:
        assert prune_finished(conn, TaskStatus.SUCCEEDED, T - timedelta(days=1)) == 1
    with db.read() as conn:
        assert [task.id for task in list_tasks(conn).items] == [kept]
        assert conn.execute(sa.text("SELECT count(*) FROM attempt")).scalar() == 1


def test_a_state_outside_the_enum_is_read_as_stored_and_counted_nowhere(
    db: Database, no_state_check: None
) -> None:
    odd = unfinished(db, TaskStatus.QUEUED, T)
    queued = unfinished(db, TaskStatus.QUEUED, T)
    by_hand(db, odd, "status", "paused")

    with db.write() as conn:
        assert get_task(conn, odd).status == "paused"
        assert not isinstance(get_task(conn, odd).status, TaskStatus)
        assert {task.id for task in list_tasks(conn).items} == {odd, queued}
        assert count_by_status(conn)[TaskStatus.QUEUED] == 1
        assert sum(task_stats(conn, now=T).counts.values()) == 1
        assert [claim.id for claim in claim_due(conn, "w", 10, lease_seconds=30, now=T)] == [queued]


def test_a_time_that_is_not_one_leaves_the_stats_answering(db: Database) -> None:
    for value in not_times(db):
        by_hand(db, unfinished(db, TaskStatus.QUEUED, T), "scheduled_at", value)

    with db.read() as conn:
        stats = task_stats(conn, now=T)
    assert stats.counts[TaskStatus.QUEUED] == len(not_times(db))
    assert stats.oldest_due_seconds is None  # no due time that is one: none is said


@pytest.mark.sqlite_only(reason="only SQLite stores text that is not UTF-8")
def test_paging_goes_past_an_id_and_a_creation_time_that_are_not_utf8(db: Database) -> None:
    ids = [unfinished(db, TaskStatus.QUEUED, T + timedelta(seconds=n)) for n in range(4)]
    with db.write() as conn:
        conn.exec_driver_sql(
            "UPDATE task SET id = CAST(X'61FF' AS TEXT), created_at = CAST(X'32FF' AS TEXT)"
            " WHERE id = ?",
            (ids[1],),
        )
        conn.exec_driver_sql("UPDATE task SET id = CAST(X'62FE' AS TEXT) WHERE id = ?", (ids[2],))
    expected = sorted([ids[0], "a\udcff", "b\udcfe", ids[3]])

    seen: list[str] = []
    cursor = None
    with db.read() as conn:
        while True:
            page = list_tasks(conn, limit=1, cursor=cursor)
            seen += [task.id for task in page.items]
            if (cursor := page.next_cursor) is None:
                break
    assert sorted(seen) == expected
