"""Outcomes are written only under a held lease; lapsed leases are reclaimed as failed attempts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from store.attempts import list_attempts
from store.engine import Database
from store.leases import LEASE_EXPIRED, claim_due, reclaim_expired
from store.models import Attempt, AttemptOutcome, Claim, Lease, Task, TaskStatus, lease_of
from store.outcomes import fail_attempt, mark_failed, mark_succeeded, schedule_retry
from store.tasks import NewTask, enqueue, get_task
from tests.support.states import as_claimed

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _seconds(n: float) -> datetime:
    return T + timedelta(seconds=n)


def _claimed(db: Database, *, max_attempts: int = 3, lease_seconds: float = 5) -> Claim:
    """A task enqueued at T and claimed by `runner-1` at T under a short lease."""
    with db.write() as conn:
        enqueue(conn, NewTask(name="t", max_attempts=max_attempts), now=T)
        (task,) = claim_due(conn, "runner-1", 1, lease_seconds=lease_seconds, now=T)
    return task


def _state(db: Database, task_id: str) -> tuple[Task, list[Attempt]]:
    with db.read() as conn:
        return get_task(conn, task_id), list_attempts(conn, task_id)


def _retry_in(seconds: float) -> tuple[list[Task], Callable[[Task], datetime | None]]:
    """A retry policy for `reclaim_expired` that records what it was asked about."""
    asked: list[Task] = []

    def decide(task: Task) -> datetime | None:
        asked.append(task)
        assert task.lease_expires_at is not None
        return task.lease_expires_at + timedelta(seconds=seconds)

    return asked, decide


def _never_asked(task: Task) -> datetime | None:
    raise AssertionError(f"the policy was consulted for {task.id} with no attempts left")


def test_mark_succeeded_records_the_result_and_closes_the_attempt(db: Database) -> None:
    task = _claimed(db)
    with db.write() as conn:
        done = mark_succeeded(conn, lease_of(task), {"rows": [1, 2]}, now=_seconds(2))
    assert done is not None
    assert done.status is TaskStatus.SUCCEEDED
    assert done.result == {"rows": [1, 2]}
    assert done.finished_at == _seconds(2)
    assert (done.lease_owner, done.lease_expires_at) == (None, None)
    stored, (attempt,) = _state(db, task.id)
    assert stored == done
    assert (attempt.outcome, attempt.finished_at, attempt.error) == (
        AttemptOutcome.SUCCEEDED,
        _seconds(2),
        None,
    )


def test_schedule_retry_waits_until_run_at(db: Database) -> None:
    task = _claimed(db)
    with db.write() as conn:
        retrying = schedule_retry(
            conn, lease_of(task), "Flaky: try again", "Traceback ...", _seconds(60), now=_seconds(1)
        )
    assert retrying is not None
    assert retrying.status is TaskStatus.RETRYING
    assert retrying.scheduled_at == _seconds(60)
    assert retrying.last_error == "Flaky: try again"
    assert retrying.finished_at is None
    _, (attempt,) = _state(db, task.id)
    assert (attempt.outcome, attempt.error, attempt.traceback) == (
        AttemptOutcome.FAILED,
        "Flaky: try again",
        "Traceback ...",
    )


def test_mark_failed_ends_the_task(db: Database) -> None:
    task = _claimed(db)
    with db.write() as conn:
        failed = mark_failed(conn, lease_of(task), "Fatal: no", None, now=_seconds(1))
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.finished_at == _seconds(1)
    assert failed.last_error == "Fatal: no"


def test_an_outcome_is_written_once(db: Database) -> None:
    task = _claimed(db)
    with db.write() as conn:
        assert mark_succeeded(conn, lease_of(task), 1, now=_seconds(1)) is not None
        assert mark_succeeded(conn, lease_of(task), 2, now=_seconds(2)) is None
        assert mark_failed(conn, lease_of(task), "E: late", None, now=_seconds(2)) is None
    stored, _ = _state(db, task.id)
    assert (stored.status, stored.result) == (TaskStatus.SUCCEEDED, 1)


@pytest.mark.parametrize("late", [5, 10], ids=["at-expiry", "after-expiry"])
def test_a_completion_after_the_lease_lapsed_is_rejected(db: Database, late: float) -> None:
    task = _claimed(db, lease_seconds=5)
    before = _state(db, task.id)
    lease = lease_of(task)
    with db.write() as conn:
        assert mark_succeeded(conn, lease, "late", now=_seconds(late)) is None
        assert fail_attempt(conn, lease, "E: late", None, _seconds(99), now=_seconds(late)) is None
        assert fail_attempt(conn, lease, "E: late", None, None, now=_seconds(late)) is None
        assert (
            schedule_retry(conn, lease, "E: late", None, _seconds(99), now=_seconds(late)) is None
        )
        assert mark_failed(conn, lease, "E: late", None, now=_seconds(late)) is None
    assert _state(db, task.id) == before


def test_a_lapsed_lease_is_reclaimed_as_a_failed_attempt_that_retries(db: Database) -> None:
    task = _claimed(db, lease_seconds=5)
    asked, decide = _retry_in(20)
    with db.write() as conn:
        assert reclaim_expired(conn, decide, now=_seconds(4)) == []
        (reclaimed,) = reclaim_expired(conn, decide, now=_seconds(10))
    assert [t.id for t in asked] == [task.id]
    assert reclaimed.status is TaskStatus.RETRYING
    assert reclaimed.last_error == LEASE_EXPIRED == "lease expired"
    assert reclaimed.scheduled_at == _seconds(5 + 20)
    assert reclaimed.finished_at is None
    assert (reclaimed.lease_owner, reclaimed.lease_expires_at) == (None, None)
    stored, (attempt,) = _state(db, task.id)
    assert stored == reclaimed
    assert attempt.outcome is AttemptOutcome.LEASE_EXPIRED
    with db.read() as conn:
        stored_outcome = conn.exec_driver_sql("SELECT outcome FROM attempt").scalar_one()
    assert stored_outcome == "lease_expired"
    assert (attempt.error, attempt.finished_at) == ("lease expired", _seconds(10))
    # The runner that lost the lease comes back late: nothing it says is written.
    with db.write() as conn:
        assert mark_succeeded(conn, lease_of(task), "late", now=_seconds(11)) is None
        assert reclaim_expired(conn, decide, now=_seconds(11)) == []
    assert _state(db, task.id)[0] == reclaimed


def test_a_lapsed_lease_on_the_last_attempt_fails_the_task(db: Database) -> None:
    task = _claimed(db, max_attempts=1, lease_seconds=5)
    with db.write() as conn:
        (reclaimed,) = reclaim_expired(conn, _never_asked, now=_seconds(5))
    assert reclaimed.id == task.id
    assert reclaimed.status is TaskStatus.FAILED
    assert reclaimed.finished_at == _seconds(5)
    assert reclaimed.last_error == "lease expired"
    _, (attempt,) = _state(db, task.id)
    assert attempt.outcome is AttemptOutcome.LEASE_EXPIRED


def test_a_lapsed_lease_fails_the_task_when_the_policy_gives_up(db: Database) -> None:
    task = _claimed(db, max_attempts=5, lease_seconds=5)
    with db.write() as conn:
        (reclaimed,) = reclaim_expired(conn, lambda _task: None, now=_seconds(6))
    assert (reclaimed.id, reclaimed.status) == (task.id, TaskStatus.FAILED)


def test_reclaim_leaves_live_leases_alone_and_honours_its_limit(db: Database) -> None:
    with db.write() as conn:
        for _ in range(3):
            enqueue(conn, NewTask(name="t"), now=T)
        short = claim_due(conn, "runner-1", 2, lease_seconds=5, now=T)
        (long,) = claim_due(conn, "runner-2", 1, lease_seconds=60, now=T)
    _, decide = _retry_in(1)
    with db.write() as conn:
        first = reclaim_expired(conn, decide, now=_seconds(10), limit=1)
        second = reclaim_expired(conn, decide, now=_seconds(10), limit=1)
        third = reclaim_expired(conn, decide, now=_seconds(10), limit=1)
    assert len(first) == len(second) == 1
    assert third == []
    assert {t.id for t in first + second} == {t.id for t in short}
    assert as_claimed(_state(db, long.id)[0]) == long


def test_the_old_lease_is_fenced_off_after_a_reclaim_and_a_new_claim(db: Database) -> None:
    task = _claimed(db, lease_seconds=5)
    old = lease_of(task)
    with db.write() as conn:
        reclaim_expired(conn, lambda _task: _seconds(10), now=_seconds(10))
        (again,) = claim_due(conn, "runner-2", 1, lease_seconds=60, now=_seconds(10))
    new = lease_of(again)
    assert new == Lease(task.id, old.token + 1)
    assert again.attempts == 2
    # The new lease runs until T+70, so "not expired" holds for both: only the token differs.
    with db.write() as conn:
        assert mark_succeeded(conn, old, "stale", now=_seconds(11)) is None
        assert fail_attempt(conn, old, "E: stale", None, None, now=_seconds(11)) is None
    assert as_claimed(_state(db, task.id)[0]) == again
    with db.write() as conn:
        done = mark_succeeded(conn, new, "fresh", now=_seconds(12))
    assert done is not None
    assert (done.status, done.result) == (TaskStatus.SUCCEEDED, "fresh")
    _, attempts = _state(db, task.id)
    assert [(a.number, a.outcome, a.worker) for a in attempts] == [
        (1, AttemptOutcome.LEASE_EXPIRED, "runner-1"),
        (2, AttemptOutcome.SUCCEEDED, "runner-2"),
    ]
