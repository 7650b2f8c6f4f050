"""The task watcher: one thread per process that hears every task change, on SQLite and on
PostgreSQL, from another engine (another process's writes), and tells only the waiters of
the tasks that changed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from app.watch import Changes, TaskWatch
from store import control, leases, outcomes
from store import progress as store_progress
from store import tasks as store_tasks
from store.engine import Database, temporary_database
from store.models import Task, TaskStatus
from store.tasks import NewTask
from store.timeutil import utcnow

DEADLINE = 15.0


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/watch.db"
        return
    server: str = request.getfixturevalue("server")
    with temporary_database(server, "backstop_watch") as url:
        yield url


@pytest.fixture
def dbs(database_url: str) -> Iterator[tuple[Database, Database]]:
    """The watcher's database and another engine on it (another process's writes)."""
    from store import migrate

    mine, other = Database.from_url(database_url), Database.from_url(database_url)
    migrate.upgrade(mine)
    yield mine, other
    mine.dispose()
    other.dispose()


def test_waiters_hear_each_change_of_their_task_made_elsewhere(
    dbs: tuple[Database, Database],
) -> None:
    mine, other = dbs
    with other.write() as conn:
        task = store_tasks.enqueue(conn, NewTask(name="t"))
    watch = TaskWatch(mine)
    try:
        with watch.changes(task.id) as changes, watch.changes(task.id) as twin:
            with other.write() as conn:
                [claim] = leases.claim_due(conn, "elsewhere", 1, lease_seconds=30)
            _until(changes, lambda t: (t.status, t.attempts) == (TaskStatus.RUNNING, 1))
            with other.write() as conn:
                store_progress.record_progress(conn, [(claim.lease, {"done": 1})])
            _until(changes, lambda t: t.progress == {"done": 1})
            with other.write() as conn:
                outcomes.mark_succeeded(conn, claim.lease, 42)
            _until(changes, lambda t: (t.status, t.result) == (TaskStatus.SUCCEEDED, 42))
            # Every waiter of the task hears it (the twin, never reading, gets the latest).
            _until(twin, lambda t: t.status == TaskStatus.SUCCEEDED)
    finally:
        watch.close()


def _until(changes: Changes, holds: Callable[[Task], bool]) -> None:
    """Take the changes the watcher hands over until one `holds` (within the deadline).
    (On PostgreSQL the first read may come from before a change: the LISTEN takes on the
    watcher's thread, and a read follows it.)"""
    deadline = time.monotonic() + DEADLINE
    while True:
        seen = changes.next(max(0.0, deadline - time.monotonic()))
        assert seen, "no change heard"
        if any(task is not None and holds(task) for task in seen):
            return


def test_waiters_hear_the_operators_and_the_runners_other_writes(
    dbs: tuple[Database, Database],
) -> None:
    mine, other = dbs
    with other.write() as conn:
        task = store_tasks.enqueue(conn, NewTask(name="t"))
    watch = TaskWatch(mine)
    try:
        with watch.changes(task.id) as changes:
            if mine.dialect == "postgresql":  # its first read follows the LISTEN: from here
                # on, each change below is heard through its own NOTIFY
                _until(changes, lambda t: t.status == TaskStatus.QUEUED)
            with other.write() as conn:
                control.cancel_task(conn, task.id)
            _until(changes, lambda t: t.status == TaskStatus.CANCELLED)
            with other.write() as conn:
                control.retry_task(conn, task.id)
            _until(changes, lambda t: t.status == TaskStatus.QUEUED)
            with other.write() as conn:
                [claim] = leases.claim_due(conn, "elsewhere", 1, lease_seconds=30)
            _until(changes, lambda t: (t.status, t.attempts) == (TaskStatus.RUNNING, 1))
            with other.write() as conn:
                leases.release(conn, [claim.lease])
            _until(changes, lambda t: (t.status, t.attempts) == (TaskStatus.QUEUED, 0))
            with other.write() as conn:
                [claim] = leases.claim_due(conn, "elsewhere", 1, lease_seconds=30)
            _until(changes, lambda t: t.status == TaskStatus.RUNNING)
            with other.write() as conn:  # a runner's batch of successes
                outcomes.record(conn, [outcomes.Outcome(claim.lease, 1, utcnow(), result=7)])
            _until(changes, lambda t: (t.status, t.result) == (TaskStatus.SUCCEEDED, 7))
    finally:
        watch.close()
