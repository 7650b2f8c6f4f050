"""`TaskClient.add_task`: durable before it returns, or with the caller's own transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from app.backstop import Backstop
from app.enqueue import TaskClient
from app.errors import InvalidArguments, InvalidSchedule
from store import tasks as store_tasks
from store.engine import Database
from store.errors import TaskNotFound
from store.models import Task, TaskStatus

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def other_db(backstop: Backstop) -> Iterator[Database]:
    """A second engine on the same file: it sees only what was committed."""
    database = Database.from_url(backstop.settings.url)
    yield database
    database.dispose()


@pytest.fixture
def wakes() -> list[int]:
    """Records each wake-up a client sends its runner."""
    return []


@pytest.fixture
def tasks(backstop: Backstop, wakes: list[int]) -> TaskClient:
    """A client on the test's database whose wake-ups are recorded."""
    return TaskClient(backstop.db, backstop.registry, wake=lambda: wakes.append(1))


def _find(db: Database, task_id: str) -> Task | None:
    with db.read() as conn:
        try:
            return store_tasks.get_task(conn, task_id)
        except TaskNotFound:
            return None


def test_add_task_returns_the_id_of_a_committed_row(
    tasks: TaskClient, other_db: Database, wakes: list[int]
) -> None:
    task_id = tasks.add_task("test.echo", 5)

    row = _find(other_db, task_id)
    assert row is not None
    assert (row.name, row.status, row.args, row.attempts) == ("test.echo", "queued", [5], 0)
    assert row.scheduled_at == row.created_at
    assert wakes == [1]


def test_task_ids_are_distinct_uuids(tasks: TaskClient) -> None:
    ids = {tasks.add_task("test.noop") for _ in range(5)}
    assert len(ids) == 5
    assert all(len(task_id) == 36 and task_id.count("-") == 4 for task_id in ids)


def test_options_are_stored_and_default_to_the_tasks_own(tasks: TaskClient, db: Database) -> None:
    defaults = tasks.add_task("test.flaky", 0)
    chosen = tasks.add_task("test.flaky", 0, queue="urgent", priority=9, max_attempts=2)

    default_row, chosen_row = _find(db, defaults), _find(db, chosen)
    assert default_row is not None
    assert chosen_row is not None
    assert (default_row.queue, default_row.priority, default_row.max_attempts) == ("default", 0, 5)
    assert (chosen_row.queue, chosen_row.priority, chosen_row.max_attempts) == ("urgent", 9, 2)


def test_in_caller_session_the_task_appears_only_when_the_caller_commits(
    backstop: Backstop, tasks: TaskClient, other_db: Database, wakes: list[int]
) -> None:
    with Session(backstop.db.engine) as session:
        task_id = tasks.add_task("test.echo", 1, session=session)
        assert _find(other_db, task_id) is None
        assert wakes == []
        session.commit()

    assert _find(other_db, task_id) is not None
    assert wakes == [1]


def test_in_caller_session_a_rollback_discards_the_task(
    backstop: Backstop, tasks: TaskClient, other_db: Database, wakes: list[int]
) -> None:
    with Session(backstop.db.engine) as session:
        task_id = tasks.add_task("test.echo", 1, session=session)
        session.rollback()

    assert _find(other_db, task_id) is None
    with other_db.read() as conn:
        assert sum(store_tasks.count_by_status(conn).values()) == 0
    assert wakes == []


def test_a_session_task_is_run_once_committed(backstop: Backstop) -> None:
    with Session(backstop.db.engine) as session:
        task_id = backstop.tasks.add_task("test.echo", 4, session=session)
        session.commit()

    done = asyncio.run(backstop.runner.drain())

    assert [(task.id, task.status, task.result) for task in done] == [
        (task_id, TaskStatus.SUCCEEDED, {"value": 4, "attempt": 1})
    ]


def test_delay_schedules_that_many_seconds_after_enqueue(tasks: TaskClient, db: Database) -> None:
    pinned = tasks.enqueue("test.noop", delay=30, now=T0)
    assert pinned.scheduled_at == T0 + timedelta(seconds=30)

    task_id = tasks.add_task("test.noop", delay=2.5)
    row = _find(db, task_id)
    assert row is not None
    assert row.scheduled_at - row.created_at == timedelta(seconds=2.5)


def test_run_at_is_stored_as_the_same_instant_in_utc(tasks: TaskClient, db: Database) -> None:
    run_at = datetime(2030, 6, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    task_id = tasks.add_task("test.noop", run_at=run_at)
    row = _find(db, task_id)
    assert row is not None
    assert row.scheduled_at == run_at
    assert row.scheduled_at.utcoffset() == timedelta(0)


def test_a_delayed_task_is_not_run_before_its_time(backstop: Backstop) -> None:
    task = backstop.tasks.enqueue("test.noop", delay=30, now=T0)

    early = asyncio.run(backstop.runner.drain(now=T0 + timedelta(seconds=29)))
    due = asyncio.run(backstop.runner.drain(now=T0 + timedelta(seconds=30)))

    assert early == []
    assert [(done.id, done.status) for done in due] == [(task.id, TaskStatus.SUCCEEDED)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": 5, "run_at": T0}, "either delay or run_at, not both"),
        ({"delay": -1}, "delay must not be negative"),
        ({"delay": float("nan")}, "delay must be a finite number of seconds, not nan"),
        ({"delay": float("inf")}, "delay must be a finite number of seconds, not inf"),
        ({"delay": 1e15}, "runs past the year 9999"),
        ({"run_at": datetime(2030, 1, 1, 12, 0)}, "run_at needs a time zone"),
        (
            {"run_at": datetime(9999, 12, 31, 23, tzinfo=timezone(-timedelta(hours=2)))},
            "outside the years 1 to 9999 in UTC",
        ),
        ({"queue": "q\udc80"}, "queue holds a lone surrogate"),
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
    ],
)
def test_impossible_schedules_are_refused_and_nothing_is_stored(
    tasks: TaskClient, db: Database, wakes: list[int], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidSchedule, match=message):
        tasks.add_task("test.noop", **options)
    with db.read() as conn:
        assert sum(store_tasks.count_by_status(conn).values()) == 0
    assert wakes == []


def test_add_task_async_returns_once_the_row_is_committed(
    tasks: TaskClient, other_db: Database, wakes: list[int]
) -> None:
    async def add() -> str:
        return await tasks.add_task_async("test.echo", 6, priority=3)

    task_id = asyncio.run(add())
    tasks.close()

    row = _find(other_db, task_id)
    assert row is not None
    assert (row.name, row.args, row.priority) == ("test.echo", [6], 3)
    assert wakes == [1]


def test_concurrent_async_adds_share_transactions_and_all_commit(
    tasks: TaskClient, backstop: Backstop, other_db: Database
) -> None:
    commits: list[int] = []

    def count(_conn: object) -> None:
        commits.append(1)

    sa.event.listen(backstop.db.engine, "commit", count)

    async def add_many() -> list[str]:
        return await asyncio.gather(*(tasks.add_task_async("test.echo", i) for i in range(50)))

    try:
        ids = asyncio.run(add_many())
    finally:
        sa.event.remove(backstop.db.engine, "commit", count)
        tasks.close()

    assert len(set(ids)) == 50
    assert all(_find(other_db, task_id) is not None for task_id in ids)
    assert len(commits) < 50  # grouped: the first commit's wait gathers the rest


def test_add_task_async_refuses_bad_arguments_before_touching_the_database(
    tasks: TaskClient, db: Database
) -> None:
    async def add() -> str:
        return await tasks.add_task_async("test.echo", "not a number")

    with pytest.raises(InvalidArguments):
        asyncio.run(add())
    tasks.close()
    with db.read() as conn:
        assert sum(store_tasks.count_by_status(conn).values()) == 0
