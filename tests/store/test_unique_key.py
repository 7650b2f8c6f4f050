"""Unique while active: at most one queued, running or retrying task per `unique_key`, held
by the database against racing enqueues (threads and processes), freed when the task ends."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier

import pytest
import sqlalchemy as sa

from store.control import cancel_task, retry_task
from store.engine import Database
from store.errors import IdempotencyConflict, InvalidTransition, UniqueKeyTaken
from store.leases import claim_due
from store.models import Task, TaskStatus, lease_of, task_table
from store.outcomes import mark_failed, mark_succeeded, schedule_retry
from store.tasks import NewTask, enqueue_once, get_task, unique_key_holder

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 5.0


def _seconds(n: float) -> datetime:
    return T + timedelta(seconds=n)


def _once(db: Database, new: NewTask, now: datetime = T) -> tuple[Task, bool]:
    with db.write() as conn:
        return enqueue_once(conn, new, now=now)


def _with_key(db: Database, key: str) -> list[Task]:
    """Every task with this unique key, active or not, oldest first."""
    query = sa.select(task_table).where(task_table.c.unique_key == key)
    with db.read() as conn:
        rows = conn.execute(query.order_by(task_table.c.created_at)).all()
        return [get_task(conn, row.id) for row in rows]


def _active(db: Database, key: str) -> list[Task]:
    return [task for task in _with_key(db, key) if not task.status.terminal]


# -- one task per key while it is active -------------------------------------------------------


def test_a_second_enqueue_with_the_key_gets_the_active_task_whatever_it_asks(
    db: Database,
) -> None:
    first, created = _once(db, NewTask(name="sync", args=[1], unique_key="user:42"))
    # Another name, arguments and queue: the key alone decides.
    other = NewTask(name="other", args=[2], queue="slow", unique_key="user:42")
    again, created_again = _once(db, other, _seconds(1))

    assert (created, created_again) == (True, False)
    assert again == first
    assert [task.id for task in _with_key(db, "user:42")] == [first.id]
    with db.read() as conn:
        assert unique_key_holder(conn, "user:42") == first
        assert unique_key_holder(conn, "user:43") is None


def test_tasks_with_other_keys_or_none_are_stored_beside_it(db: Database) -> None:
    keyed, _ = _once(db, NewTask(name="t", unique_key="a"))
    other, created = _once(db, NewTask(name="t", unique_key="b"))

    assert created
    assert other.id != keyed.id
    assert [task.id for task in _active(db, "a")] == [keyed.id]


def _running(db: Database, new: NewTask) -> Task:
    _once(db, new)
    with db.write() as conn:
        (claim,) = claim_due(conn, "runner-1", 1, lease_seconds=LEASE, now=_seconds(1))
        return get_task(conn, claim.id)


def _retrying(db: Database, new: NewTask) -> Task:
    running = _running(db, new)
    with db.write() as conn:
        retrying = schedule_retry(
            conn, lease_of(running), "Oops: once", None, _seconds(60), now=_seconds(2)
        )
    assert retrying is not None
    return retrying


@pytest.mark.parametrize("make", [_running, _retrying], ids=["running", "retrying"])
def test_a_running_or_retrying_task_holds_its_key(
    db: Database, make: Callable[[Database, NewTask], Task]
) -> None:
    holder = make(db, NewTask(name="t", unique_key="k"))

    again, created = _once(db, NewTask(name="t", unique_key="k"), _seconds(3))

    assert not created
    assert again.id == holder.id
    assert again.status == holder.status


def _succeed(db: Database, task: Task) -> None:
    with db.write() as conn:
        (claim,) = claim_due(conn, "runner-1", 1, lease_seconds=LEASE, now=_seconds(1))
        assert claim.id == task.id
        assert mark_succeeded(conn, lease_of(claim), 1, now=_seconds(2)) is not None


def _fail(db: Database, task: Task) -> None:
    with db.write() as conn:
        (claim,) = claim_due(conn, "runner-1", 1, lease_seconds=LEASE, now=_seconds(1))
        assert mark_failed(conn, lease_of(claim), "Fatal: no", None, now=_seconds(2)) is not None


def _cancel(db: Database, task: Task) -> None:
    with db.write() as conn:
        cancel_task(conn, task.id, now=_seconds(2))


@pytest.mark.parametrize(
    "end", [_succeed, _fail, _cancel], ids=["succeeded", "failed", "cancelled"]
)
def test_the_key_is_free_again_once_its_task_ended(
    db: Database, end: Callable[[Database, Task], None]
) -> None:
    first, _ = _once(db, NewTask(name="t", unique_key="k"))
    end(db, first)

    second, created = _once(db, NewTask(name="t", unique_key="k"), _seconds(3))

    assert created
    assert second.id != first.id
    assert [task.id for task in _active(db, "k")] == [second.id]
    assert len(_with_key(db, "k")) == 2  # the ended one is kept, its key with it
    third, created_again = _once(db, NewTask(name="t", unique_key="k"), _seconds(4))
    assert (third.id, created_again) == (second.id, False)


# -- with an idempotency key -------------------------------------------------------------------


def test_with_both_keys_the_idempotency_key_is_looked_up_first(db: Database) -> None:
    asked = NewTask(name="t", idempotency_key="req-1", request_hash="h", unique_key="k")
    first, _ = _once(db, asked)
    _cancel(db, first)  # the unique key is free; the idempotency key is not
    replay = NewTask(name="t", idempotency_key="req-1", request_hash="h", unique_key="k")

    again, created = _once(db, replay, _seconds(3))

    assert (again.id, again.status, created) == (first.id, TaskStatus.CANCELLED, False)
    with pytest.raises(IdempotencyConflict):
        _once(db, NewTask(name="t", idempotency_key="req-1", request_hash="x", unique_key="k"))


def test_a_held_unique_key_answers_a_new_idempotency_key_and_records_nothing(
    db: Database,
) -> None:
    holder, _ = _once(db, NewTask(name="t", unique_key="k"))

    asked = NewTask(name="t", idempotency_key="req-2", request_hash="h", unique_key="k")
    answer, created = _once(db, asked, _seconds(1))

    assert (answer.id, created) == (holder.id, False)
    assert answer.idempotency_key is None  # the holder's, not the request's
    _cancel(db, holder)
    # Nothing was stored under req-2, so its replay is a new request: the key is free now.
    replayed, created_now = _once(db, asked, _seconds(3))
    assert created_now
    assert replayed.id == asked.id
    assert replayed.idempotency_key == "req-2"


# -- retrying a task whose key another task holds ----------------------------------------------


def test_a_retry_is_refused_while_another_task_holds_the_key_and_changes_nothing(
    db: Database,
) -> None:
    first, _ = _once(db, NewTask(name="t", unique_key="k"))
    _fail(db, first)
    holder, _ = _once(db, NewTask(name="t", unique_key="k"), _seconds(3))

    with db.write() as conn:
        with pytest.raises(UniqueKeyTaken, match=f"'k' is held by task {holder.id}") as caught:
            retry_task(conn, first.id, now=_seconds(4))
        # The transaction goes on (PostgreSQL's too: the refused UPDATE had a savepoint).
        assert get_task(conn, first.id).status == TaskStatus.FAILED
    assert (caught.value.task_id, caught.value.holder_id) == (first.id, holder.id)
    with db.read() as conn:
        assert get_task(conn, first.id).status == TaskStatus.FAILED

    _cancel(db, holder)
    with db.write() as conn:
        retried = retry_task(conn, first.id, now=_seconds(5))
    assert retried.status == TaskStatus.QUEUED
    assert [task.id for task in _active(db, "k")] == [first.id]


def test_a_retry_of_an_active_keyed_task_still_says_what_state_it_is_in(db: Database) -> None:
    task, _ = _once(db, NewTask(name="t", unique_key="k"))
    with pytest.raises(InvalidTransition, match="is queued"), db.write() as conn:
        retry_task(conn, task.id)


# -- racing enqueues ---------------------------------------------------------------------------

RACERS = 8
KEYS = 25


def _race(url: str, keys: list[str]) -> list[tuple[str, str, bool]]:
    """Enqueue once with each key, on a pool of its own (as another process would have):
    `(key, the id answered, whether this call stored it)` for each."""
    own = Database.from_url(url)
    try:
        answers = []
        for key in keys:
            with own.write() as conn:
                task, created = enqueue_once(conn, NewTask(name="t", unique_key=key))
            answers.append((key, task.id, created))
        return answers
    finally:
        own.dispose()


def _check_race(db: Database, answers: list[tuple[str, str, bool]], racers: int) -> None:
    """Each key has one task, every racer was answered with it, and one racer stored it."""
    assert len(answers) == racers * KEYS
    for key in (f"key-{n}" for n in range(KEYS)):
        (stored,) = _with_key(db, key)
        mine = [(task_id, created) for k, task_id, created in answers if k == key]
        assert {task_id for task_id, _ in mine} == {stored.id}
        assert sum(created for _, created in mine) == 1


def test_threads_racing_with_the_same_keys_store_one_task_per_key(db: Database) -> None:
    url = db.engine.url.render_as_string(hide_password=False)
    keys = [f"key-{n}" for n in range(KEYS)]
    start = threading.Barrier(RACERS)
    answers: list[tuple[str, str, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race() -> None:
        try:
            start.wait(timeout=10)
            mine = _race(url, keys)
            with lock:
                answers.extend(mine)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=race) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(45)

    assert errors == []
    _check_race(db, answers, RACERS)


def _race_in_process(
    url: str, keys: list[str], meet: Barrier, out: multiprocessing.Queue[object]
) -> None:
    try:
        meet.wait(timeout=30)
        out.put(_race(url, keys))
    except BaseException:
        out.put(traceback.format_exc())
        raise


def test_processes_racing_with_the_same_keys_store_one_task_per_key(db: Database) -> None:
    url = db.engine.url.render_as_string(hide_password=False)
    keys = [f"key-{n}" for n in range(KEYS)]
    processes = 4
    ctx = multiprocessing.get_context("spawn")
    meet = ctx.Barrier(processes)
    out: multiprocessing.Queue[object] = ctx.Queue()
    procs = [
        ctx.Process(target=_race_in_process, args=(url, keys, meet, out)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [out.get(timeout=50) for _ in procs]
    except queue.Empty:
        pytest.fail("a racing process did not report in time")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    errors = [report for report in reports if isinstance(report, str)]
    assert errors == []
    answers = [answer for report in reports if isinstance(report, list) for answer in report]
    _check_race(db, answers, processes)


def test_enqueues_racing_with_cancels_of_the_holder_never_fail(db: Database) -> None:
    # Each thread takes the key's task and cancels it, so the holder keeps ending between a
    # racer's refused INSERT and its read of the holder: the enqueue then tries again.
    url = db.engine.url.render_as_string(hide_password=False)
    rounds = 15
    start = threading.Barrier(RACERS)
    stored: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def churn() -> None:
        own = Database.from_url(url)
        try:
            start.wait(timeout=10)
            for _ in range(rounds):
                with own.write() as conn:
                    task, created = enqueue_once(conn, NewTask(name="t", unique_key="k"))
                assert task.unique_key == "k"
                if created:
                    with lock:
                        stored.append(task.id)
                try:
                    with own.write() as conn:
                        cancel_task(conn, task.id)
                except InvalidTransition:
                    pass  # another racer cancelled it first
        except BaseException as exc:
            with lock:
                errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=churn) for _ in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(45)

    assert errors == []
    assert sorted(task.id for task in _with_key(db, "k")) == sorted(stored)
    assert len(_active(db, "k")) <= 1
