"""Enqueueing, reading and listing tasks, and the invariants the database itself enforces."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from store import migrate
from store.attempts import list_attempts
from store.engine import Database
from store.errors import InvalidCursor, TaskNotFound
from store.leases import claim_due
from store.models import Task, TaskStatus, lease_of, task_table
from store.outcomes import mark_failed, mark_succeeded
from store.tasks import (
    NewTask,
    count_by_status,
    enqueue,
    enqueue_batch,
    enqueue_many,
    enqueue_once,
    get_task,
    get_tasks,
    list_tasks,
    stored_row,
    stored_task,
)

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _all_pages(db: Database, limit: int, **filters: Any) -> list[list[str]]:
    """The ids of every page of a listing, following the cursor to the end."""
    pages: list[list[str]] = []
    cursor: str | None = None
    with db.read() as conn:
        while True:
            page = list_tasks(conn, limit=limit, cursor=cursor, **filters)
            pages.append([task.id for task in page.items])
            if page.next_cursor is None:
                return pages
            assert len(page.items) == limit
            cursor = page.next_cursor


def test_enqueue_stores_a_queued_task(db: Database) -> None:
    with db.write() as conn:
        task = enqueue(
            conn,
            NewTask(
                name="reports.build",
                args=[1, "two"],
                kwargs={"three": [3]},
                queue="reports",
                priority=4,
                max_attempts=2,
                idempotency_key="k-1",
            ),
            now=T,
        )
    with db.read() as conn:
        stored = get_task(conn, task.id)
    assert stored == task
    assert stored.status is TaskStatus.QUEUED
    assert (stored.args, stored.kwargs) == ([1, "two"], {"three": [3]})
    assert (stored.queue, stored.priority, stored.max_attempts) == ("reports", 4, 2)
    assert stored.created_at == stored.scheduled_at == T
    assert stored.attempts == stored.lease_token == 0
    assert stored.started_at is stored.finished_at is stored.result is None
    assert stored.idempotency_key == "k-1"


def test_enqueue_gives_random_ids_and_keeps_a_delay(db: Database) -> None:
    with db.write() as conn:
        first, second = enqueue_many(
            conn,
            [NewTask(name="a"), NewTask(name="b", scheduled_at=T + timedelta(hours=1))],
            now=T,
        )
        assert enqueue_many(conn, [], now=T) == []
    assert first.id != second.id
    assert len(first.id) == 36
    assert second.scheduled_at == T + timedelta(hours=1)
    with db.read() as conn:
        assert {task.id for task in get_tasks(conn, [first.id, second.id, "missing"])} == {
            first.id,
            second.id,
        }
        assert get_tasks(conn, []) == []


def test_an_idempotency_key_is_unique(db: Database) -> None:
    with db.write() as conn:
        enqueue(conn, NewTask(name="a", idempotency_key="same"), now=T)
    with pytest.raises(IntegrityError, match=r"(?i)UNIQUE"), db.write() as conn:
        enqueue(conn, NewTask(name="b", idempotency_key="same"), now=T)
    with db.write() as conn:
        # Tasks without a key never collide.
        enqueue_many(conn, [NewTask(name="c"), NewTask(name="d")], now=T)
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 3


def test_an_enqueue_outside_a_transaction_begins_one_and_a_rollback_undoes_it(
    db: Database,
) -> None:
    # The hot statements go to the driver's cursor, whose connection is in autocommit mode;
    # they must begin a transaction as SQLAlchemy's own execution would.
    with db.engine.connect() as conn:
        enqueue_many(conn, [NewTask(name="a"), NewTask(name="b")], now=T)
        enqueue_once(conn, NewTask(name="c", idempotency_key="k"), now=T)
        assert conn.in_transaction()
        conn.rollback()
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 0


# Values that each column's conversion must get exactly right: JSON with unicode, floats,
# nesting and nulls; times with and without microseconds, and in another time zone.
ODD_TASKS = [
    NewTask(name="plain"),
    NewTask(
        name="odd.values",
        args=[1, -2.5, 1e-7, 10**18, 'é ☃ \u0000 "q"', None, True, [], {}],
        kwargs={"nested": {"list": [{"x": None}]}, "ünï": "cödé", "big": 2**53 + 1},
        queue="slow",
        priority=-7,
        max_attempts=1,
        scheduled_at=datetime(2031, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        idempotency_key="key-\u00e9",
        request_hash="f" * 64,
    ),
    NewTask(
        name="offset.time",
        scheduled_at=datetime(2030, 6, 1, 9, 30, tzinfo=timezone(timedelta(hours=2))),
    ),
]


def _raw_rows(db: Database) -> dict[str, tuple[Any, ...]]:
    """Every row as SQLite holds it (text, storage class and all), by name, without the id."""
    columns = [column.name for column in task_table.columns if column.name != "id"]
    select = ", ".join(f"{name}, typeof({name})" for name in columns)
    with db.read() as conn:
        rows = conn.exec_driver_sql(f"SELECT name, {select} FROM task").all()
    return {row[0]: tuple(row[1:]) for row in rows}


@pytest.mark.sqlite_only(reason="only SQLite's enqueue hands rows to the driver itself")
@pytest.mark.parametrize("now", [T, T.replace(microsecond=123456)])
def test_enqueue_stores_exactly_what_sqlalchemy_would(tmp_path: Path, now: datetime) -> None:
    # On SQLite the enqueue functions hand rows to the driver themselves: every column must
    # hold the same text, number or NULL as through SQLAlchemy's own insert.
    ours = Database.from_url(f"sqlite:///{tmp_path / 'ours.db'}")
    theirs = Database.from_url(f"sqlite:///{tmp_path / 'theirs.db'}")
    for database in (ours, theirs):
        migrate.upgrade(database)
    with ours.write() as conn:
        enqueue(conn, ODD_TASKS[0], now=now)
        enqueue_once(conn, ODD_TASKS[1], now=now)
        enqueue_batch(conn, [(ODD_TASKS[2], now)])
    with theirs.write() as conn:
        conn.execute(sa.insert(task_table), [_sqlalchemy_row(new, now) for new in ODD_TASKS])
    try:
        assert _raw_rows(ours) == _raw_rows(theirs)
        with ours.read() as conn:
            for new in ODD_TASKS:
                assert get_task(conn, new.id) == stored_task(new, now)
    finally:
        ours.dispose()
        theirs.dispose()


def _sqlalchemy_row(new: NewTask, now: datetime) -> dict[str, Any]:
    return {
        "id": new.id,
        "name": new.name,
        "status": TaskStatus.QUEUED,
        "queue": new.queue,
        "priority": new.priority,
        "args": new.args,
        "kwargs": new.kwargs,
        "attempts": 0,
        "max_attempts": new.max_attempts,
        "created_at": now,
        "scheduled_at": new.scheduled_at or now,
        "idempotency_key": new.idempotency_key,
        "request_hash": new.request_hash,
    }


def test_a_stored_row_reads_like_the_task_read_back(db: Database) -> None:
    with db.write() as conn:
        enqueue_many(conn, ODD_TASKS, now=T)
    with db.read() as conn:
        for new in ODD_TASKS:
            assert get_task(conn, new.id).model_dump() == stored_row(new, T)


def test_get_task_raises_for_an_unknown_id(db: Database) -> None:
    with db.read() as conn, pytest.raises(TaskNotFound) as caught:
        get_task(conn, "no-such-task")
    assert caught.value.task_id == "no-such-task"


def test_list_attempts_raises_for_an_unknown_task(db: Database) -> None:
    with db.write() as conn:
        task = enqueue(conn, NewTask(name="a"), now=T)
    with db.read() as conn:
        assert list_attempts(conn, task.id) == []
        with pytest.raises(TaskNotFound):
            list_attempts(conn, "no-such-task")


def test_list_tasks_is_newest_first(db: Database) -> None:
    with db.write() as conn:
        ids = [enqueue(conn, NewTask(name="t"), now=T + timedelta(seconds=i)).id for i in range(5)]
    with db.read() as conn:
        page = list_tasks(conn)
    assert [task.id for task in page.items] == ids[::-1]
    assert page.next_cursor is None


def test_list_tasks_filters_by_status_name_and_queue(db: Database) -> None:
    with db.write() as conn:
        a = enqueue(conn, NewTask(name="mail", queue="fast"), now=T)
        b = enqueue(conn, NewTask(name="mail", queue="slow"), now=T + timedelta(seconds=1))
        c = enqueue(conn, NewTask(name="hook", queue="fast"), now=T + timedelta(seconds=2))
        (running,) = claim_due(conn, "w", 1, lease_seconds=30, now=T + timedelta(seconds=3))
    assert running.id == a.id

    def ids(**filters: Any) -> list[str]:
        with db.read() as conn:
            return [task.id for task in list_tasks(conn, **filters).items]

    assert ids(name="mail") == [b.id, a.id]
    assert ids(queue="fast") == [c.id, a.id]
    assert ids(status=TaskStatus.RUNNING) == [a.id]
    assert ids(status=TaskStatus.QUEUED) == [c.id, b.id]
    assert ids(name="mail", queue="fast") == [a.id]
    assert ids(name="mail", status=TaskStatus.QUEUED, queue="slow") == [b.id]
    assert ids(name="nothing") == []
    assert ids(status=TaskStatus.FAILED) == []


def test_the_cursor_pages_through_everything_once_even_with_equal_created_at(
    db: Database,
) -> None:
    with db.write() as conn:
        # 23 tasks in one statement share one created_at; 7 more a second later/earlier.
        same = enqueue_many(conn, [NewTask(name="t") for _ in range(23)], now=T)
        later = enqueue_many(
            conn, [NewTask(name="t") for _ in range(4)], now=T + timedelta(seconds=1)
        )
        earlier = enqueue_many(
            conn, [NewTask(name="t") for _ in range(3)], now=T - timedelta(seconds=1)
        )
    for limit in (1, 4, 5, 30, 31):
        pages = _all_pages(db, limit)
        listed = [task_id for page in pages for task_id in page]
        assert len(listed) == len(set(listed)) == 30, f"limit={limit}"
        assert set(listed[:4]) == {task.id for task in later}
        assert set(listed[4:27]) == {task.id for task in same}
        assert set(listed[27:]) == {task.id for task in earlier}
        assert len(pages) == -(-30 // limit)


def test_the_cursor_keeps_the_filters_and_is_stable_under_inserts(db: Database) -> None:
    with db.write() as conn:
        old = enqueue_many(conn, [NewTask(name="keep") for _ in range(6)], now=T)
        enqueue_many(conn, [NewTask(name="other") for _ in range(6)], now=T)
    with db.read() as conn:
        first = list_tasks(conn, name="keep", limit=4)
    assert first.next_cursor is not None
    with db.write() as conn:
        enqueue(conn, NewTask(name="keep"), now=T + timedelta(minutes=1))
    with db.read() as conn:
        rest = list_tasks(conn, name="keep", limit=4, cursor=first.next_cursor)
    assert rest.next_cursor is None
    seen = [task.id for task in first.items + rest.items]
    assert sorted(seen) == sorted(task.id for task in old)


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "garbage",
        "!!!!",
        "é",
        _b64("no separator"),
        _b64("not-a-date|some-id"),
        _b64("2026-03-01T12:00:00|naive-time"),
        base64.urlsafe_b64encode(b"\xff\xfe|x").decode(),
    ],
)
def test_a_garbage_cursor_is_refused(db: Database, cursor: str) -> None:
    with db.read() as conn, pytest.raises(InvalidCursor) as caught:
        list_tasks(conn, cursor=cursor)
    assert caught.value.cursor == cursor


def test_count_by_status_names_every_state(db: Database) -> None:
    with db.read() as conn:
        assert count_by_status(conn) == dict.fromkeys(TaskStatus, 0)
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t") for _ in range(4)], now=T)
        first, second = claim_due(conn, "w", 2, lease_seconds=30, now=T)
        mark_succeeded(conn, lease_of(first), None, now=T)
        mark_failed(conn, lease_of(second), "E: x", None, now=T)
        claim_due(conn, "w", 1, lease_seconds=30, now=T)
    with db.read() as conn:
        counts = count_by_status(conn)
    assert list(counts) == list(TaskStatus)
    assert counts == {
        TaskStatus.QUEUED: 1,
        TaskStatus.RUNNING: 1,
        TaskStatus.RETRYING: 0,
        TaskStatus.SUCCEEDED: 1,
        TaskStatus.FAILED: 1,
        TaskStatus.CANCELLED: 0,
    }


def _queued(db: Database, **values: Any) -> Task:
    with db.write() as conn:
        return enqueue(conn, NewTask(name="t", **values), now=T)


def _update(db: Database, task_id: str, **values: Any) -> None:
    with db.write() as conn:
        conn.execute(sa.update(task_table).where(task_table.c.id == task_id).values(**values))


@pytest.mark.parametrize(
    ("values", "constraint"),
    [
        ({"status": TaskStatus.SUCCEEDED}, "ck_task_terminal_finished"),
        ({"status": TaskStatus.FAILED}, "ck_task_terminal_finished"),
        ({"status": TaskStatus.CANCELLED}, "ck_task_terminal_finished"),
        ({"status": "lost"}, "ck_task_status"),
        ({"status": TaskStatus.RUNNING}, "ck_task_running_leased"),
        ({"status": TaskStatus.RUNNING, "lease_owner": "w"}, "ck_task_running_leased"),
        ({"attempts": 6}, "ck_task_attempts"),
        ({"attempts": -1}, "ck_task_attempts"),
        ({"max_attempts": 0}, "ck_task_max_attempts"),
    ],
)
def test_updates_that_break_an_invariant_are_refused(
    db: Database, values: dict[str, Any], constraint: str
) -> None:
    task = _queued(db, max_attempts=5)
    with pytest.raises(IntegrityError, match=constraint):
        _update(db, task.id, **values)
    with db.read() as conn:
        assert get_task(conn, task.id) == task


def test_a_task_needs_at_least_one_attempt(db: Database) -> None:
    with pytest.raises(IntegrityError, match="ck_task_max_attempts"), db.write() as conn:
        enqueue(conn, NewTask(name="t", max_attempts=0), now=T)
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 0


def test_an_insert_straight_into_a_terminal_state_needs_finished_at(db: Database) -> None:
    row = {
        "id": "x",
        "name": "t",
        "status": TaskStatus.SUCCEEDED,
        "queue": "default",
        "priority": 0,
        "args": [],
        "kwargs": {},
        "attempts": 1,
        "max_attempts": 1,
        "created_at": T,
        "scheduled_at": T,
        "lease_token": 1,
    }
    with pytest.raises(IntegrityError, match="ck_task_terminal_finished"), db.write() as conn:
        conn.execute(sa.insert(task_table), [row])
    with db.write() as conn:
        conn.execute(sa.insert(task_table), [{**row, "finished_at": T}])
    with pytest.raises(IntegrityError, match="ck_task_attempts"), db.write() as conn:
        conn.execute(sa.insert(task_table), [{**row, "id": "y", "finished_at": T, "attempts": 2}])
