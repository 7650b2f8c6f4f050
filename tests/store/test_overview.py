"""The overview the dashboard and `backstop top` show: queues with their due work, tasks
finished per minute, and the runners seen in leases and recent attempts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from store import migrate
from store.engine import Database, create_database, drop_database
from store.leases import claim_due
from store.models import TaskStatus as S
from store.outcomes import mark_succeeded
from store.runners import LATEST_ATTEMPTS, RunnerSeen, recent_runners
from store.stats import overview, queue_overview, throughput
from store.tasks import NewTask, enqueue
from tests.support.states import finished, unfinished

T = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, db: Database) -> Iterator[Database]:
    """The test's migrated SQLite file, or a new migrated database on the PostgreSQL server
    (the overview's statements group by expressions, which the two dialects treat apart)."""
    if request.param == "sqlite":
        yield db
        return
    server: str = request.getfixturevalue("server")
    name = f"backstop_test_{uuid4().hex[:16]}"
    pg = Database.from_url(create_database(server, name))
    try:
        migrate.upgrade(pg)
        yield pg
    finally:
        pg.dispose()
        drop_database(server, name)


def test_each_queue_has_its_counts_and_the_age_of_its_oldest_due_task(store: Database) -> None:
    unfinished(store, S.QUEUED, T - 90 * MINUTE, queue="mail")
    unfinished(store, S.QUEUED, T - 5 * MINUTE, queue="mail")
    unfinished(store, S.QUEUED, T - MINUTE, queue="late", due=T + MINUTE)  # not due yet
    finished(store, S.SUCCEEDED, T - MINUTE, queue="late")
    unfinished(store, S.RETRYING, T - 3 * MINUTE, queue="again", due=T - 2 * MINUTE)

    with store.read() as conn:
        queues = queue_overview(conn, now=T)
        seen = overview(conn, now=T)

    assert sorted(queues) == ["again", "late", "mail"]
    assert queues["mail"].counts[S.QUEUED] == 2
    assert queues["mail"].oldest_due_seconds == 90 * 60
    assert queues["late"].oldest_due_seconds is None
    assert queues["late"].counts[S.SUCCEEDED] == 1
    assert queues["again"].oldest_due_seconds == 2 * 60
    assert seen.stats.oldest_due_seconds == 90 * 60
    assert seen.stats.counts[S.QUEUED] == 3
    assert [q.name for q in seen.queues] == ["again", "late", "mail"]


def test_throughput_counts_what_finished_in_each_of_the_last_minutes(store: Database) -> None:
    start = T.replace(second=0)
    finished(store, S.SUCCEEDED, start + timedelta(seconds=5))  # this minute, so far
    finished(store, S.SUCCEEDED, start - timedelta(seconds=1))  # the minute before
    finished(store, S.FAILED, start - timedelta(seconds=30))
    finished(store, S.SUCCEEDED, start - 14 * MINUTE)  # the first minute of the window
    finished(store, S.SUCCEEDED, start - 14 * MINUTE - timedelta(seconds=1))  # before it
    finished(store, S.CANCELLED, start)  # not work done

    with store.read() as conn:
        minutes = throughput(conn, now=T)

    assert len(minutes) == 15
    assert minutes[0].start == start - 14 * MINUTE
    assert minutes[-1].start == start
    assert [(m.succeeded, m.failed) for m in minutes if m.succeeded or m.failed] == [
        (1, 0),
        (1, 1),
        (1, 0),
    ]
    assert (minutes[-1].succeeded, minutes[-2].failed, minutes[0].succeeded) == (1, 1, 1)


def test_runners_are_seen_in_their_leases_and_their_recent_attempts(store: Database) -> None:
    with store.write() as conn:
        for _ in range(3):
            enqueue(conn, NewTask(name="test.noop"), now=T - 60 * MINUTE)
        (old,) = claim_due(conn, "gone", 1, lease_seconds=3600, now=T - 10 * MINUTE)
        assert mark_succeeded(conn, old.lease, None, now=T - 9 * MINUTE)
        (done,) = claim_due(conn, "idle", 1, lease_seconds=3600, now=T - 2 * MINUTE)
        assert mark_succeeded(conn, done.lease, None, now=T - MINUTE)
        assert claim_due(conn, "busy", 1, lease_seconds=3600, now=T - 30 * MINUTE)

    with store.read() as conn:
        runners = recent_runners(conn, now=T)

    # "gone" finished its last attempt nine minutes ago; "busy" holds a lease, whenever
    # its attempt started.
    assert runners == [
        RunnerSeen("busy", 1, None),
        RunnerSeen("idle", 0, T - MINUTE),
    ]
    assert LATEST_ATTEMPTS >= 1000
