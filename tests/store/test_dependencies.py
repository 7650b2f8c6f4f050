"""`after=` and follow-ups: a task waits for its parents, runs once each succeeded, and ends
cancelled when one fails or is cancelled; follow-ups exist only with their parent's success."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from store.control import cancel_task, retry_task
from store.engine import Database
from store.errors import ParentNotSucceeded, UnknownParents
from store.leases import claim_due, reclaim_expired
from store.models import Claim, Task, TaskStatus, dependency_table
from store.outcomes import Outcome, mark_failed, mark_succeeded, record
from store.stats import queue_overview
from store.tasks import NewTask, enqueue, get_task, get_tasks, list_tasks

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


def _enqueue(db: Database, name: str, after: Sequence[str] = (), **options: object) -> Task:
    with db.write() as conn:
        return enqueue(conn, NewTask(name=name, after=tuple(after), **options), now=T)  # type: ignore[arg-type]


def _claim(db: Database, limit: int = 10, now: datetime = T) -> list[Claim]:
    with db.write() as conn:
        return claim_due(conn, "runner-1", limit, lease_seconds=30, now=now)


def _get(db: Database, task_id: str) -> Task:
    with db.read() as conn:
        return get_task(conn, task_id)


def _succeed(db: Database, claims: Sequence[Claim], **follow_ups: Sequence[NewTask]) -> None:
    """Record these claims' successes in one batch, as the runner does."""
    with db.write() as conn:
        states = record(
            conn,
            [
                Outcome(
                    c.lease,
                    c.attempts,
                    _at(1),
                    result=c.name,
                    follow_ups=tuple(follow_ups.get(c.name, ())),
                )
                for c in claims
            ],
        )
    assert states == [TaskStatus.SUCCEEDED] * len(claims)


def _links(db: Database) -> int:
    with db.read() as conn:
        return len(conn.execute(dependency_table.select()).all())


def test_a_child_waits_until_its_parent_succeeds(db: Database) -> None:
    parent = _enqueue(db, "parent")
    child = _enqueue(db, "child", after=[parent.id])
    assert (child.status, child.waiting_on, child.after) == (TaskStatus.QUEUED, 1, [parent.id])
    assert _get(db, parent.id).has_dependants is True
    (claim,) = _claim(db)
    assert claim.id == parent.id
    assert _claim(db) == []  # the child is not claimable
    _succeed(db, [claim])
    assert _get(db, child.id).waiting_on == 0
    assert [c.id for c in _claim(db)] == [child.id]
    assert _links(db) == 0  # spent


def test_a_child_of_several_parents_runs_only_after_all_succeeded(db: Database) -> None:
    first, second = _enqueue(db, "a"), _enqueue(db, "b")
    _enqueue(db, "plain")
    child = _enqueue(db, "child", after=[first.id, second.id])
    assert child.waiting_on == 2
    claims = {c.name: c for c in _claim(db)}
    assert set(claims) == {"a", "b", "plain"}
    _succeed(db, [claims["a"], claims["plain"]])
    assert _get(db, child.id).waiting_on == 1
    assert _claim(db) == []
    _succeed(db, [claims["b"]])
    assert [c.id for c in _claim(db)] == [child.id]


def test_parents_succeeding_in_one_batch_release_the_child_once_each(db: Database) -> None:
    first, second = _enqueue(db, "a"), _enqueue(db, "b")
    child = _enqueue(db, "child", after=[first.id, second.id])
    _succeed(db, _claim(db))
    assert _get(db, child.id).waiting_on == 0
    assert [c.id for c in _claim(db)] == [child.id]


def test_a_failed_parent_cancels_its_children_and_theirs(db: Database) -> None:
    parent = _enqueue(db, "parent")
    child = _enqueue(db, "child", after=[parent.id])
    grandchild = _enqueue(db, "grandchild", after=[child.id])
    (claim,) = _claim(db)
    with db.write() as conn:
        mark_failed(conn, claim.lease, "ValueError: no", None, now=_at(2))
    done = _get(db, child.id)
    assert (done.status, done.last_error, done.finished_at) == (
        TaskStatus.CANCELLED,
        f"parent task {parent.id} failed",
        _at(2),
    )
    last = _get(db, grandchild.id)
    assert (last.status, last.last_error) == (
        TaskStatus.CANCELLED,
        f"parent task {child.id} was cancelled",
    )
    assert _links(db) == 0


def test_cancelling_a_waiting_parent_cancels_its_children(db: Database) -> None:
    parent = _enqueue(db, "parent")
    child = _enqueue(db, "child", after=[parent.id])
    with db.write() as conn:
        cancel_task(conn, parent.id, now=_at(1))
    assert _get(db, child.id).last_error == f"parent task {parent.id} was cancelled"
    assert _get(db, child.id).status is TaskStatus.CANCELLED


def test_a_running_parent_cancelled_cancels_its_children_and_enqueues_no_follow_up(
    db: Database,
) -> None:
    parent = _enqueue(db, "parent")
    child = _enqueue(db, "child", after=[parent.id])
    (claim,) = _claim(db)
    with db.write() as conn:
        cancel_task(conn, parent.id, now=_at(1))
        done = mark_succeeded(
            conn,
            claim.lease,
            None,
            follow_ups=[NewTask(name="next", parent_id=parent.id)],
            now=_at(2),
        )
    assert done is not None
    assert done.status is TaskStatus.CANCELLED
    assert _get(db, child.id).status is TaskStatus.CANCELLED
    with db.read() as conn:
        assert sorted(t.name for t in list_tasks(conn).items) == ["child", "parent"]


def test_a_parent_whose_lease_lapsed_for_the_last_time_cancels_its_children(db: Database) -> None:
    parent = _enqueue(db, "parent", max_attempts=1)
    child = _enqueue(db, "child", after=[parent.id])
    _claim(db)
    with db.write() as conn:
        (reclaimed,) = reclaim_expired(conn, lambda task: None, now=_at(60))
    assert reclaimed.status is TaskStatus.FAILED
    assert _get(db, child.id).last_error == f"parent task {parent.id} failed"


def test_after_a_parent_already_ended(db: Database) -> None:
    failed, succeeded = _enqueue(db, "failed"), _enqueue(db, "succeeded")
    claims = {c.name: c for c in _claim(db)}
    with db.write() as conn:
        mark_failed(conn, claims["failed"].lease, "E: x", None, now=_at(1))
    _succeed(db, [claims["succeeded"]])
    runs = _enqueue(db, "runs", after=[succeeded.id])
    assert (runs.status, runs.waiting_on) == (TaskStatus.QUEUED, 0)
    cancelled = _enqueue(db, "cancelled", after=[succeeded.id, failed.id])
    assert (cancelled.status, cancelled.last_error) == (
        TaskStatus.CANCELLED,
        f"parent task {failed.id} failed",
    )
    assert _get(db, cancelled.id) == cancelled
    assert [c.id for c in _claim(db)] == [runs.id]


def test_an_unknown_parent_is_refused_and_nothing_is_stored(db: Database) -> None:
    parent = _enqueue(db, "parent")
    with pytest.raises(UnknownParents, match="no task 'nope'"), db.write() as conn:
        enqueue(conn, NewTask(name="child", after=(parent.id, "nope")), now=T)
    with db.read() as conn:
        assert [t.id for t in list_tasks(conn).items] == [parent.id]
    assert _get(db, parent.id).has_dependants is False
    assert _links(db) == 0


def test_follow_ups_exist_once_with_the_success_and_may_wait_on_each_other(db: Database) -> None:
    parent = _enqueue(db, "parent")
    first = NewTask(name="first", parent_id=parent.id)
    second = NewTask(name="second", parent_id=parent.id, after=(parent.id,))
    join = NewTask(name="join", parent_id=parent.id, after=(first.id, second.id))
    _succeed(db, _claim(db), parent=[first, second, join])
    with db.read() as conn:
        made = {t.name: t for t in get_tasks(conn, [first.id, second.id, join.id])}
    assert {t.parent_id for t in made.values()} == {parent.id}
    assert (made["second"].waiting_on, made["join"].waiting_on) == (0, 2)
    assert made["join"].after == [first.id, second.id]
    claims = {c.name: c for c in _claim(db, now=_at(2))}
    assert set(claims) == {"first", "second"}
    _succeed(db, list(claims.values()))
    assert [c.id for c in _claim(db, now=_at(3))] == [join.id]


def test_a_fenced_off_or_failed_attempt_enqueues_no_follow_up(db: Database) -> None:
    parent = _enqueue(db, "parent", max_attempts=3)
    (claim,) = _claim(db)
    lost = NewTask(name="lost", parent_id=parent.id)
    with db.write() as conn:
        # Taken over: the lease lapsed and another runner claimed the task again.
        reclaim_expired(conn, lambda task: _at(31), now=_at(31))
        (again,) = claim_due(conn, "runner-2", 1, lease_seconds=30, now=_at(31))
        states = record(conn, [Outcome(claim.lease, claim.attempts, _at(32), follow_ups=(lost,))])
        assert states == [None]
        failed = mark_failed(conn, again.lease, "E: x", None, now=_at(33))
    assert failed is not None
    with db.read() as conn:
        assert get_tasks(conn, [lost.id]) == []


def test_a_follow_up_after_a_missing_task_is_stored_cancelled(db: Database) -> None:
    parent = _enqueue(db, "parent")
    orphan = NewTask(name="orphan", parent_id=parent.id, after=("gone",))
    _succeed(db, _claim(db), parent=[orphan])
    stored = _get(db, orphan.id)
    assert (stored.status, stored.last_error) == (
        TaskStatus.CANCELLED,
        "parent task gone does not exist",
    )


def test_a_retried_child_waits_again_and_only_once_its_parent_can_succeed(db: Database) -> None:
    parent = _enqueue(db, "parent", max_attempts=1)
    child = _enqueue(db, "child", after=[parent.id])
    (claim,) = _claim(db)
    with db.write() as conn:
        mark_failed(conn, claim.lease, "E: x", None, now=_at(1))
    with pytest.raises(ParentNotSucceeded, match="retry that one first"), db.write() as conn:
        retry_task(conn, child.id, now=_at(2))
    with db.write() as conn:
        retry_task(conn, parent.id, now=_at(2))
        again = retry_task(conn, child.id, now=_at(2))
    assert (again.status, again.waiting_on) == (TaskStatus.QUEUED, 1)
    (claim,) = _claim(db, now=_at(3))
    assert claim.id == parent.id
    _succeed(db, [claim])
    assert [c.id for c in _claim(db, now=_at(4))] == [child.id]


def _blocked(db: Database, thread: threading.Thread) -> None:
    """Return once `thread` waits on a row lock (PostgreSQL). On SQLite it waits for the
    write lock this test holds, wherever it is now: the order is settled all the same."""
    if db.dialect != "postgresql":
        return
    deadline = time.monotonic() + 10
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    while time.monotonic() < deadline:
        assert thread.is_alive()
        with db.read() as conn:
            if conn.exec_driver_sql(query).scalar_one() > 0:
                return
        time.sleep(0.01)
    raise AssertionError("the other transaction never waited for the row lock")


def test_an_enqueue_waiting_on_its_parents_success_sees_it_succeeded(db: Database) -> None:
    parent = _enqueue(db, "parent")
    (claim,) = _claim(db)
    children: list[Task] = []
    adder = threading.Thread(target=lambda: children.append(_enqueue(db, "c", [parent.id])))
    with db.write() as conn:
        record(conn, [Outcome(claim.lease, claim.attempts, _at(1))])
        adder.start()
        _blocked(db, adder)
    adder.join()
    (child,) = children
    assert (child.status, child.waiting_on) == (TaskStatus.QUEUED, 0)
    assert _get(db, child.id).waiting_on == 0


def test_a_success_waiting_on_an_enqueue_of_its_child_releases_it(db: Database) -> None:
    parent = _enqueue(db, "parent")
    (claim,) = _claim(db)
    succeeder = threading.Thread(target=_succeed, args=(db, [claim]))
    with db.write() as conn:
        child = enqueue(conn, NewTask(name="c", after=(parent.id,)), now=T)
        assert child.waiting_on == 1
        succeeder.start()
        _blocked(db, succeeder)
    succeeder.join()
    assert _get(db, child.id).waiting_on == 0
    assert [c.id for c in _claim(db)] == [child.id]


def _add_children(db: Database, parent_id: str, go: threading.Barrier, into: list[str]) -> None:
    go.wait()
    for _ in range(5):
        into.append(_enqueue(db, "child", after=[parent_id]).id)


def test_enqueues_racing_their_parents_success_are_never_stranded(db: Database) -> None:
    """Children enqueued after= a running parent from another thread while the parent's
    success is written: each one is released, or stored not waiting, never left waiting."""
    rounds = 10
    for n in range(rounds):
        parent = _enqueue(db, f"parent-{n}")
        (claim,) = _claim(db)
        go = threading.Barrier(2)
        children: list[str] = []
        adder = threading.Thread(target=_add_children, args=(db, parent.id, go, children))
        adder.start()
        go.wait()
        _succeed(db, [claim])
        adder.join()
        with db.read() as conn:
            stored = get_tasks(conn, children)
        assert [(t.status, t.waiting_on) for t in stored] == [(TaskStatus.QUEUED, 0)] * 5
        with db.write() as conn:  # out of the way of the next round's claim
            for task_id in children:
                cancel_task(conn, task_id, now=T)


def test_a_waiting_task_counts_as_queued_but_not_due(db: Database) -> None:
    parent = _enqueue(db, "parent", scheduled_at=_at(600))
    _enqueue(db, "child", after=[parent.id])
    with db.read() as conn:
        for finished in (True, False):
            (queue,) = queue_overview(conn, _at(60), finished=finished).values()
            assert queue.counts[TaskStatus.QUEUED] == 2
            assert queue.oldest_due_seconds is None
