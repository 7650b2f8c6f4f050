"""Queue stats: counts per state and queue, and how long the oldest due task has waited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from store.engine import Database
from store.models import TaskStatus as S
from store.stats import QueueOverview, QueueStats, queue_names, queue_overview, task_stats
from tests.support.states import finished, unfinished

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ZERO = dict.fromkeys(S, 0)


def stats_at(db: Database, now: datetime) -> QueueStats:
    with db.read() as conn:
        return task_stats(conn, now=now)


def test_an_empty_store_counts_zero_in_every_state_and_nothing_is_due(db: Database) -> None:
    stats = stats_at(db, T)
    assert stats.counts == ZERO
    assert stats.queues == {}
    assert stats.oldest_due_seconds is None


def test_counts_are_per_state_overall_and_per_queue(db: Database) -> None:
    # The queued ones last: the others are claimed first, and a claim takes any due task.
    finished(db, S.SUCCEEDED, T, queue="default")
    unfinished(db, S.RUNNING, T, queue="default")
    finished(db, S.FAILED, T, queue="email")
    finished(db, S.CANCELLED, T, queue="email")
    unfinished(db, S.RETRYING, T, queue="email")
    for _ in range(2):
        unfinished(db, S.QUEUED, T, queue="default")

    stats = stats_at(db, T)

    assert stats.counts == {
        S.QUEUED: 2,
        S.RUNNING: 1,
        S.RETRYING: 1,
        S.SUCCEEDED: 1,
        S.FAILED: 1,
        S.CANCELLED: 1,
    }
    assert stats.queues == {
        "default": {**ZERO, S.QUEUED: 2, S.RUNNING: 1, S.SUCCEEDED: 1},
        "email": {**ZERO, S.RETRYING: 1, S.FAILED: 1, S.CANCELLED: 1},
    }


def test_the_oldest_due_age_counts_queued_and_retrying_tasks_due_by_now(db: Database) -> None:
    unfinished(db, S.QUEUED, T - timedelta(minutes=5))
    unfinished(db, S.RETRYING, T - timedelta(hours=3), due=T - timedelta(minutes=90))
    # Older, but not waiting: running, finished, or scheduled for later.
    unfinished(db, S.RUNNING, T - timedelta(days=2))
    finished(db, S.FAILED, T - timedelta(days=2))
    unfinished(db, S.QUEUED, T - timedelta(days=2), due=T + timedelta(seconds=1))

    assert stats_at(db, T).oldest_due_seconds == 90 * 60
    assert stats_at(db, T - timedelta(minutes=90)).oldest_due_seconds == 0
    assert stats_at(db, T - timedelta(minutes=90, microseconds=1)).oldest_due_seconds is None


def test_nothing_is_due_when_every_waiting_task_is_scheduled_later(db: Database) -> None:
    unfinished(db, S.QUEUED, T - timedelta(days=1), due=T + timedelta(microseconds=1))
    unfinished(db, S.RETRYING, T - timedelta(days=1), due=T + timedelta(hours=1))
    unfinished(db, S.RUNNING, T - timedelta(days=1))
    finished(db, S.SUCCEEDED, T - timedelta(days=1))

    stats = stats_at(db, T)

    assert stats.counts == {**ZERO, S.QUEUED: 1, S.RETRYING: 1, S.RUNNING: 1, S.SUCCEEDED: 1}
    assert stats.oldest_due_seconds is None
    assert stats_at(db, T + timedelta(microseconds=1)).oldest_due_seconds == 0


def test_the_overview_gives_each_queue_its_counts_and_its_own_oldest_due_age(
    db: Database,
) -> None:
    unfinished(db, S.QUEUED, T - timedelta(minutes=5), queue="default")
    unfinished(db, S.RETRYING, T - timedelta(hours=3), due=T - timedelta(minutes=90), queue="mail")
    unfinished(db, S.RUNNING, T - timedelta(days=2), queue="mail")
    finished(db, S.SUCCEEDED, T - timedelta(days=2), queue="done")

    with db.read() as conn:
        everything = queue_overview(conn, T)
        unfinished_only = queue_overview(conn, T, finished=False)

    assert everything == {
        "default": QueueOverview("default", {**ZERO, S.QUEUED: 1}, 5 * 60),
        "done": QueueOverview("done", {**ZERO, S.SUCCEEDED: 1}, None),
        "mail": QueueOverview("mail", {**ZERO, S.RETRYING: 1, S.RUNNING: 1}, 90 * 60),
    }
    # The finished states read 0, and a queue of finished tasks alone is still listed.
    assert unfinished_only == {**everything, "done": QueueOverview("done", ZERO, None)}


def test_queue_names_lists_each_queue_once_in_order(db: Database) -> None:
    for queue in ("b", "a", "b", "c"):
        finished(db, S.SUCCEEDED, T, queue=queue)
    with db.read() as conn:
        assert queue_names(conn) == ["a", "b", "c"]
