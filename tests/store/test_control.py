"""Operator actions in the store: cancel and retry, the outcomes of a cancelled running task,
enqueue-once under an idempotency key, per-queue claims and poison tasks."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from store.attempts import list_attempts
from store.control import cancel_requested, cancel_task, retry_task
from store.engine import Database
from store.errors import IdempotencyConflict, InvalidTransition, TaskNotFound
from store.leases import claim_due, reclaim_expired, release
from store.models import Attempt, AttemptOutcome, Claim, Task, TaskStatus, lease_of
from store.outcomes import fail_attempt, mark_failed, mark_succeeded
from store.tasks import NewTask, count_by_status, enqueue, enqueue_once, get_task

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 5.0


def _seconds(n: float) -> datetime:
    return T + timedelta(seconds=n)


def _queued(db: Database) -> Task:
    with db.write() as conn:
        return enqueue(conn, NewTask(name="t"), now=T)


def _claimed(db: Database, *, max_attempts: int = 3, now: datetime = T) -> Claim:
    """A task enqueued at T and claimed by `runner-1` at `now` under a 5 s lease."""
    with db.write() as conn:
        enqueue(conn, NewTask(name="t", max_attempts=max_attempts), now=T)
        (task,) = claim_due(conn, "runner-1", 1, lease_seconds=LEASE, now=now)
    return task


def _state(db: Database, task_id: str) -> tuple[Task, list[Attempt]]:
    with db.read() as conn:
        return get_task(conn, task_id), list_attempts(conn, task_id)


def _retry_at_once(task: Task) -> datetime | None:
    assert task.lease_expires_at is not None
    return task.lease_expires_at


def _failed(db: Database) -> Task:
    task = _claimed(db, max_attempts=1)
    with db.write() as conn:
        failed = mark_failed(conn, lease_of(task), "Fatal: no", "Traceback ...", now=_seconds(1))
    assert failed is not None
    return failed


def _succeeded(db: Database) -> Task:
    task = _claimed(db)
    with db.write() as conn:
        done = mark_succeeded(conn, lease_of(task), 42, now=_seconds(1))
    assert done is not None
    return done


def _cancelled(db: Database) -> Task:
    task = _queued(db)
    with db.write() as conn:
        return cancel_task(conn, task.id, now=_seconds(1))


# -- cancel ------------------------------------------------------------------------------------


def test_cancelling_a_queued_task_ends_it_at_once_and_it_is_never_claimed(db: Database) -> None:
    task = _queued(db)

    with db.write() as conn:
        cancelled = cancel_task(conn, task.id, now=_seconds(3))
        assert claim_due(conn, "runner-1", 10, lease_seconds=LEASE, now=_seconds(100)) == []

    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.finished_at == _seconds(3)
    assert cancelled.cancel_requested_at == _seconds(3)
    assert cancelled.attempts == 0
    assert _state(db, task.id) == (cancelled, [])


def test_cancelling_a_retrying_task_ends_it_at_once(db: Database) -> None:
    task = _claimed(db)
    with db.write() as conn:
        retrying = fail_attempt(conn, lease_of(task), "Flaky: x", None, _seconds(60), now=T)
    assert retrying is not None
    assert retrying.status is TaskStatus.RETRYING

    with db.write() as conn:
        cancelled = cancel_task(conn, task.id, now=_seconds(2))
        assert claim_due(conn, "runner-1", 10, lease_seconds=LEASE, now=_seconds(100)) == []

    assert (cancelled.status, cancelled.finished_at) == (TaskStatus.CANCELLED, _seconds(2))
    assert cancelled.last_error == "Flaky: x"
    _, attempts = _state(db, task.id)
    assert [a.outcome for a in attempts] == [AttemptOutcome.FAILED]


def test_cancelling_a_running_task_only_asks_it_to_stop(db: Database) -> None:
    task = _claimed(db)

    with db.write() as conn:
        asked = cancel_task(conn, task.id, now=_seconds(1))
        again = cancel_task(conn, task.id, now=_seconds(2))

    assert asked.status is TaskStatus.RUNNING
    assert asked.finished_at is None
    assert asked.cancel_requested_at == _seconds(1)
    # A second cancel keeps the first request's time.
    assert again.cancel_requested_at == _seconds(1)
    assert (again.lease_owner, again.lease_token) == ("runner-1", task.lease_token)


def test_cancel_requested_names_only_running_tasks_asked_to_stop(db: Database) -> None:
    asked = _claimed(db)
    left_alone = _claimed(db)
    queued = _queued(db)
    with db.write() as conn:
        cancel_task(conn, asked.id, now=_seconds(1))
        cancel_task(conn, queued.id, now=_seconds(1))

    with db.read() as conn:
        assert cancel_requested(conn, [asked.id, left_alone.id, queued.id, "missing"]) == {asked.id}
        assert cancel_requested(conn, []) == set()


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (_succeeded, TaskStatus.SUCCEEDED),
        (_failed, TaskStatus.FAILED),
        (_cancelled, TaskStatus.CANCELLED),
    ],
)
def test_cancelling_a_finished_task_is_an_invalid_transition_and_changes_nothing(
    db: Database, make: object, status: TaskStatus
) -> None:
    assert callable(make)
    task: Task = make(db)
    before = _state(db, task.id)

    with pytest.raises(InvalidTransition) as caught, db.write() as conn:
        cancel_task(conn, task.id, now=_seconds(9))

    assert caught.value.status == status
    assert str(caught.value) == (
        f"task {task.id!r} is {status}: only queued, retrying or running tasks can be cancelled"
    )
    assert _state(db, task.id) == before


def test_cancelling_an_unknown_task_is_not_found(db: Database) -> None:
    with pytest.raises(TaskNotFound, match="'nope' not found"), db.write() as conn:
        cancel_task(conn, "nope")


# -- outcomes of a cancelled running task ----------------------------------------------------


def test_a_success_after_a_cancel_request_ends_cancelled_and_discards_the_result(
    db: Database,
) -> None:
    task = _claimed(db)
    with db.write() as conn:
        cancel_task(conn, task.id, now=_seconds(1))
        done = mark_succeeded(conn, lease_of(task), {"big": "result"}, now=_seconds(2))

    assert done is not None
    assert (done.status, done.result, done.finished_at) == (
        TaskStatus.CANCELLED,
        None,
        _seconds(2),
    )
    assert (done.lease_owner, done.lease_expires_at) == (None, None)
    stored, (attempt,) = _state(db, task.id)
    assert stored == done
    assert (attempt.outcome, attempt.finished_at) == (AttemptOutcome.CANCELLED, _seconds(2))


def test_a_failure_after_a_cancel_request_ends_cancelled_instead_of_retrying(
    db: Database,
) -> None:
    task = _claimed(db)
    with db.write() as conn:
        cancel_task(conn, task.id, now=_seconds(1))
        done = fail_attempt(
            conn, lease_of(task), "CancelledError: cancelled", "tb", _seconds(60), now=_seconds(2)
        )

    assert done is not None
    assert done.status is TaskStatus.CANCELLED
    assert done.last_error == "CancelledError: cancelled"
    _, (attempt,) = _state(db, task.id)
    assert (attempt.outcome, attempt.error) == (
        AttemptOutcome.CANCELLED,
        "CancelledError: cancelled",
    )


def test_release_of_a_task_asked_to_stop_ends_it_cancelled_not_queued(db: Database) -> None:
    asked = _claimed(db)
    other = _claimed(db)
    with db.write() as conn:
        cancel_task(conn, asked.id, now=_seconds(1))
        assert release(conn, [lease_of(asked), lease_of(other)], now=_seconds(2)) == 2

    cancelled, (attempt,) = _state(db, asked.id)
    assert (cancelled.status, cancelled.finished_at, cancelled.attempts) == (
        TaskStatus.CANCELLED,
        _seconds(2),
        1,
    )
    assert (cancelled.lease_owner, cancelled.lease_expires_at) == (None, None)
    assert (attempt.outcome, attempt.finished_at) == (AttemptOutcome.CANCELLED, _seconds(2))
    requeued, (other_attempt,) = _state(db, other.id)
    assert (requeued.status, requeued.attempts) == (TaskStatus.QUEUED, 0)
    assert other_attempt.outcome is AttemptOutcome.RELEASED


def test_a_lapsed_lease_of_a_task_asked_to_stop_ends_it_cancelled(db: Database) -> None:
    task = _claimed(db)
    with db.write() as conn:
        cancel_task(conn, task.id, now=_seconds(1))
        (reclaimed,) = reclaim_expired(conn, _retry_at_once, now=_seconds(LEASE + 1))

    assert reclaimed.status is TaskStatus.CANCELLED
    assert reclaimed.finished_at == _seconds(LEASE + 1)
    _, (attempt,) = _state(db, task.id)
    assert attempt.outcome is AttemptOutcome.CANCELLED


# -- retry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_failed, _cancelled])
def test_retry_queues_a_failed_or_cancelled_task_again_with_a_fresh_budget(
    db: Database, make: object
) -> None:
    assert callable(make)
    task: Task = make(db)
    _, history_before = _state(db, task.id)

    with db.write() as conn:
        again = retry_task(conn, task.id, now=_seconds(30))

    assert again.status is TaskStatus.QUEUED
    assert (again.attempts, again.max_attempts) == (0, task.max_attempts)
    assert again.expirations == 0
    assert again.scheduled_at == _seconds(30)
    assert (again.finished_at, again.result, again.cancel_requested_at) == (None, None, None)
    assert again.created_at == task.created_at
    stored, history = _state(db, task.id)
    assert stored == again
    assert history == history_before

    with db.write() as conn:
        assert claim_due(conn, "runner-2", 1, lease_seconds=LEASE, now=_seconds(29)) == []
        (claimed,) = claim_due(conn, "runner-2", 1, lease_seconds=LEASE, now=_seconds(30))
        done = mark_succeeded(conn, lease_of(claimed), "ok", now=_seconds(31))
    assert claimed.attempts == 1
    assert done is not None
    assert (done.status, done.result) == (TaskStatus.SUCCEEDED, "ok")
    _, history_after = _state(db, task.id)
    assert history_after[: len(history_before)] == history_before
    assert (history_after[-1].outcome, history_after[-1].worker) == (
        AttemptOutcome.SUCCEEDED,
        "runner-2",
    )


def test_a_retried_task_that_was_cancelled_while_running_is_not_cancelled_again(
    db: Database,
) -> None:
    task = _claimed(db)
    with db.write() as conn:
        cancel_task(conn, task.id, now=_seconds(1))
        mark_succeeded(conn, lease_of(task), None, now=_seconds(2))
        retry_task(conn, task.id, now=_seconds(3))
        (claimed,) = claim_due(conn, "runner-1", 1, lease_seconds=LEASE, now=_seconds(3))
        done = mark_succeeded(conn, lease_of(claimed), "second", now=_seconds(4))

    assert done is not None
    assert (done.status, done.result) == (TaskStatus.SUCCEEDED, "second")


def _running(db: Database) -> Claim:
    return _claimed(db)


def _retrying(db: Database) -> Task:
    task = _claimed(db)
    with db.write() as conn:
        retrying = fail_attempt(conn, lease_of(task), "Flaky: x", None, _seconds(60), now=T)
    assert retrying is not None
    return retrying


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (_queued, TaskStatus.QUEUED),
        (_running, TaskStatus.RUNNING),
        (_retrying, TaskStatus.RETRYING),
        (_succeeded, TaskStatus.SUCCEEDED),
    ],
)
def test_retry_of_a_task_that_is_not_failed_or_cancelled_is_an_invalid_transition(
    db: Database, make: object, status: TaskStatus
) -> None:
    assert callable(make)
    task: Task = make(db)
    before = _state(db, task.id)

    with pytest.raises(InvalidTransition) as caught, db.write() as conn:
        retry_task(conn, task.id)

    assert caught.value.status == status
    assert str(caught.value) == (
        f"task {task.id!r} is {status}: only failed or cancelled tasks can be retried"
    )
    assert _state(db, task.id) == before


def test_retry_of_an_unknown_task_is_not_found(db: Database) -> None:
    with pytest.raises(TaskNotFound), db.write() as conn:
        retry_task(conn, "nope")


# -- idempotent enqueue ------------------------------------------------------------------------


def test_enqueue_once_stores_one_task_per_key(db: Database) -> None:
    first = NewTask(name="t", args=[1], idempotency_key="k", request_hash="h1")
    replay = NewTask(name="t", args=[1], idempotency_key="k", request_hash="h1")
    other = NewTask(name="t", args=[2], idempotency_key="k", request_hash="h2")

    with db.write() as conn:
        stored, created = enqueue_once(conn, first, now=T)
        existing, created_again = enqueue_once(conn, replay, now=_seconds(5))
        with pytest.raises(IdempotencyConflict, match="'k' was already used") as caught:
            enqueue_once(conn, other, now=_seconds(6))

    assert (created, created_again) == (True, False)
    assert existing == stored
    assert existing.id == first.id != replay.id
    assert caught.value.task_id == first.id
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 1


def test_enqueue_once_needs_a_key(db: Database) -> None:
    with pytest.raises(ValueError, match="idempotency key"), db.write() as conn:
        enqueue_once(conn, NewTask(name="t"))


def test_threads_racing_with_one_key_store_one_task(db: Database) -> None:
    url = db.engine.url.render_as_string(hide_password=False)
    racers = 8
    start = threading.Barrier(racers)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race() -> None:
        own = Database.from_url(url)  # its own connection pool, as another process would
        try:
            start.wait(timeout=10)
            with own.write() as conn:
                outcome = enqueue_once(
                    conn, NewTask(name="t", idempotency_key="once", request_hash="h"), now=T
                )
            with lock:
                results.append((outcome[0].id, outcome[1]))
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert len(results) == racers
    assert sum(created for _, created in results) == 1
    assert len({task_id for task_id, _ in results}) == 1
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 1


# -- per-queue claims --------------------------------------------------------------------------


def test_a_claim_for_one_queue_takes_only_that_queues_tasks(db: Database) -> None:
    with db.write() as conn:
        default = enqueue(conn, NewTask(name="t", priority=100), now=T)
        email = [enqueue(conn, NewTask(name="t", queue="email"), now=T) for _ in range(2)]
        claimed = claim_due(conn, "w", 10, lease_seconds=LEASE, queue="email", now=T)
        assert claim_due(conn, "w", 10, lease_seconds=LEASE, queue="slow", now=T) == []

    assert {task.id for task in claimed} == {task.id for task in email}
    assert _state(db, default.id)[0].status is TaskStatus.QUEUED


# -- poison tasks ------------------------------------------------------------------------------


def test_a_task_whose_lease_lapses_max_expirations_times_fails_saying_so(db: Database) -> None:
    task = _claimed(db, max_attempts=5)

    with db.write() as conn:
        (first,) = reclaim_expired(conn, _retry_at_once, max_expirations=2, now=_seconds(6))
    assert (first.status, first.expirations, first.last_error) == (
        TaskStatus.RETRYING,
        1,
        "lease expired",
    )

    with db.write() as conn:
        (again,) = claim_due(conn, "runner-2", 1, lease_seconds=LEASE, now=_seconds(6))
        (second,) = reclaim_expired(conn, _retry_at_once, max_expirations=2, now=_seconds(12))

    assert again.id == task.id
    assert second.status is TaskStatus.FAILED
    assert second.expirations == 2
    assert second.attempts == 2 < second.max_attempts
    assert second.finished_at == _seconds(12)
    message = "lease expired 2 times: the task may be crashing its runner"
    assert second.last_error == message
    _, attempts = _state(db, task.id)
    assert [(a.number, a.outcome, a.error) for a in attempts] == [
        (1, AttemptOutcome.LEASE_EXPIRED, "lease expired"),
        (2, AttemptOutcome.LEASE_EXPIRED, message),
    ]


def test_without_max_expirations_only_the_policy_decides(db: Database) -> None:
    task = _claimed(db, max_attempts=3)
    for n in range(2):
        with db.write() as conn:
            (reclaimed,) = reclaim_expired(conn, _retry_at_once, now=_seconds(10 * n + 6))
            assert reclaimed.status is TaskStatus.RETRYING
            claim_due(conn, "w", 1, lease_seconds=LEASE, now=_seconds(10 * n + 6))
    with db.write() as conn:
        (last,) = reclaim_expired(conn, _retry_at_once, now=_seconds(26))
    assert (last.id, last.status, last.expirations) == (task.id, TaskStatus.FAILED, 3)
    assert last.last_error == "lease expired"


def test_an_attempt_that_ends_normally_does_not_count_as_an_expiry(db: Database) -> None:
    _claimed(db, max_attempts=5)
    with db.write() as conn:
        reclaim_expired(conn, _retry_at_once, max_expirations=2, now=_seconds(6))
        (again,) = claim_due(conn, "w", 1, lease_seconds=LEASE, now=_seconds(6))
        retrying = fail_attempt(
            conn, lease_of(again), "Flaky: x", None, _seconds(7), now=_seconds(7)
        )
    assert retrying is not None
    assert (retrying.status, retrying.expirations) == (TaskStatus.RETRYING, 1)


def test_retry_resets_the_expiry_count_of_a_poisoned_task(db: Database) -> None:
    task = _claimed(db, max_attempts=5)
    with db.write() as conn:
        (poisoned,) = reclaim_expired(conn, _retry_at_once, max_expirations=1, now=_seconds(6))
        assert (poisoned.status, poisoned.expirations) == (TaskStatus.FAILED, 1)
        again = retry_task(conn, task.id, now=_seconds(7))
    assert (again.status, again.expirations, again.attempts) == (TaskStatus.QUEUED, 0, 0)
