"""Claiming due tasks, extending leases and releasing them: order, limits, and no double claims."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import traceback
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Barrier

import pytest

from store.attempts import list_attempts
from store.engine import Database
from store.leases import claim_due, extend_leases, release
from store.models import AttemptOutcome, Claim, TaskStatus, lease_of
from store.outcomes import mark_succeeded, schedule_retry
from store.tasks import NewTask, enqueue, enqueue_many, get_task, get_tasks
from tests.support.states import as_claimed

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0


def _url(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=False)


def _enqueue(db: Database, count: int, *, now: datetime = T) -> set[str]:
    with db.write() as conn:
        tasks = enqueue_many(conn, [NewTask(name="t") for _ in range(count)], now=now)
    return {task.id for task in tasks}


def _claim(db: Database, limit: int, *, owner: str = "w1", now: datetime = T) -> list[Claim]:
    with db.write() as conn:
        return claim_due(conn, owner, limit, lease_seconds=LEASE, now=now)


def _drain(db: Database, owner: str, meet: threading.Barrier | Barrier) -> list[str]:
    """Claim batches of 7 until a claim comes back empty; the ids in the order they came.

    The claimers meet before their first claim and again after it, so both are in the race
    (SQLite's busy handler is not fair: a waiting claimer can sleep through a whole drain).
    Between claims each reads its batch back, as a runner would run it: time outside the
    write lock in which the other claimer gets its turn.
    """
    meet.wait(timeout=20)
    batch = _claim(db, 7, owner=owner)
    meet.wait(timeout=20)
    taken: list[str] = []
    while batch:
        taken.extend(task.id for task in batch)
        with db.read() as conn:
            mine = get_tasks(conn, [task.id for task in batch])
        if {task.lease_owner for task in mine} != {owner}:
            raise AssertionError(f"{owner} claimed tasks it does not hold")
        batch = _claim(db, 7, owner=owner)
    return taken


def _drain_in_process(
    url: str, owner: str, meet: Barrier, out: multiprocessing.Queue[tuple[str, list[str] | str]]
) -> None:
    """A spawned claimer: its own engine on the same file; reports ids (or a traceback)."""
    db = Database.from_url(url)
    try:
        out.put((owner, _drain(db, owner, meet)))
    except BaseException:
        out.put((owner, traceback.format_exc()))
        raise
    finally:
        db.dispose()


def _assert_split(all_ids: set[str], taken: dict[str, list[str]]) -> None:
    claimed = [task_id for ids in taken.values() for task_id in ids]
    assert len(claimed) == len(set(claimed)), "a task was claimed twice"
    assert set(claimed) == all_ids
    assert all(taken.values()), "a claimer took nothing: there was no race"


def test_two_threads_never_claim_the_same_task(db: Database) -> None:
    all_ids = _enqueue(db, 400)
    meet = threading.Barrier(2)
    taken: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def run(owner: str) -> None:
        try:
            taken[owner] = _drain(db, owner, meet)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"thread-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert set(taken) == {"thread-0", "thread-1"}
    _assert_split(all_ids, taken)
    with db.read() as conn:
        tasks = [get_task(conn, task_id) for task_id in all_ids]
    assert {task.status for task in tasks} == {TaskStatus.RUNNING}
    assert {task.lease_token for task in tasks} == {1}
    assert all(task.lease_owner in taken and task.id in taken[task.lease_owner] for task in tasks)


def test_two_processes_never_claim_the_same_task(db: Database) -> None:
    all_ids = _enqueue(db, 400)
    ctx = multiprocessing.get_context("spawn")
    meet = ctx.Barrier(2)
    out: multiprocessing.Queue[tuple[str, list[str] | str]] = ctx.Queue()
    procs = [
        ctx.Process(target=_drain_in_process, args=(_url(db), f"proc-{i}", meet, out))
        for i in range(2)
    ]
    for proc in procs:
        proc.start()
    taken: dict[str, list[str]] = {}
    try:
        for _ in procs:
            owner, result = out.get(timeout=45)
            assert isinstance(result, list), f"{owner} failed:\n{result}"
            taken[owner] = result
    except queue.Empty:
        pytest.fail("a claiming process did not report in time")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert set(taken) == {"proc-0", "proc-1"}
    _assert_split(all_ids, taken)
    with db.read() as conn:
        owners = {task_id: get_task(conn, task_id).lease_owner for task_id in all_ids}
    assert all(owners[task_id] == owner for owner, ids in taken.items() for task_id in ids)


def test_claim_takes_the_lease_and_records_the_attempt(db: Database) -> None:
    (task_id,) = _enqueue(db, 1)
    (task,) = _claim(db, 5, owner="runner-a", now=T + timedelta(seconds=1))
    assert task.id == task_id
    assert task.status is TaskStatus.RUNNING
    assert task.lease_owner == "runner-a"
    assert task.lease_expires_at == T + timedelta(seconds=1 + LEASE)
    assert task.lease_token == 1
    assert task.attempts == 1
    assert task.started_at == T + timedelta(seconds=1)
    with db.read() as conn:
        assert as_claimed(get_task(conn, task_id)) == task
        (attempt,) = list_attempts(conn, task_id)
    assert (attempt.number, attempt.worker, attempt.started_at) == (
        1,
        "runner-a",
        T + timedelta(seconds=1),
    )
    assert attempt.finished_at is None
    assert attempt.outcome is None
    assert _claim(db, 5, now=T + timedelta(seconds=2)) == []


def test_claim_waits_for_scheduled_at(db: Database) -> None:
    with db.write() as conn:
        later = enqueue(conn, NewTask(name="t", scheduled_at=T + timedelta(minutes=5)), now=T)
    assert _claim(db, 10, now=T) == []
    assert _claim(db, 10, now=T + timedelta(minutes=5) - timedelta(microseconds=1)) == []
    assert [task.id for task in _claim(db, 10, now=T + timedelta(minutes=5))] == [later.id]


def test_claim_orders_by_priority_then_oldest_scheduled(db: Database) -> None:
    def at(minutes: int) -> datetime:
        return T - timedelta(minutes=minutes)

    # Inserted in an order that matches neither priority nor schedule.
    wanted = [
        NewTask(name="p0-old", priority=0, scheduled_at=at(30)),
        NewTask(name="p5-new", priority=5, scheduled_at=at(1)),
        NewTask(name="p0-new", priority=0, scheduled_at=at(2)),
        NewTask(name="p-1", priority=-1, scheduled_at=at(60)),
        NewTask(name="p5-old", priority=5, scheduled_at=at(10)),
        NewTask(name="p9", priority=9, scheduled_at=at(0)),
    ]
    with db.write() as conn:
        enqueue_many(conn, wanted, now=at(90))
    one_by_one = [_claim(db, 1) for _ in wanted]
    assert [[task.name for task in batch] for batch in one_by_one] == [
        ["p9"],
        ["p5-old"],
        ["p5-new"],
        ["p0-old"],
        ["p0-new"],
        ["p-1"],
    ]
    assert _claim(db, 1) == []


def test_claim_returns_a_batch_in_claim_order(db: Database) -> None:
    with db.write() as conn:
        enqueue_many(
            conn,
            [
                NewTask(name="low", priority=0, scheduled_at=T - timedelta(minutes=9)),
                NewTask(name="high-new", priority=3, scheduled_at=T - timedelta(minutes=1)),
                NewTask(name="high-old", priority=3, scheduled_at=T - timedelta(minutes=5)),
            ],
            now=T - timedelta(minutes=10),
        )
    assert [task.name for task in _claim(db, 10)] == ["high-old", "high-new", "low"]


def test_claim_respects_limit(db: Database) -> None:
    all_ids = _enqueue(db, 10)
    assert _claim(db, 0) == []
    assert _claim(db, -1) == []
    first = _claim(db, 4)
    second = _claim(db, 4)
    third = _claim(db, 4)
    assert [len(first), len(second), len(third)] == [4, 4, 2]
    assert {task.id for task in first + second + third} == all_ids


def test_claim_skips_running_and_finished_tasks_and_takes_due_retries(db: Database) -> None:
    (task_id,) = _enqueue(db, 1)
    (task,) = _claim(db, 1)
    assert _claim(db, 1, owner="w2") == []
    with db.write() as conn:
        retrying = schedule_retry(
            conn, lease_of(task), "Boom: x", None, T + timedelta(seconds=10), now=T
        )
    assert retrying is not None
    assert retrying.status is TaskStatus.RETRYING
    assert _claim(db, 1, owner="w2", now=T + timedelta(seconds=9)) == []
    (again,) = _claim(db, 1, owner="w2", now=T + timedelta(seconds=10))
    assert (again.id, again.attempts, again.lease_token) == (task_id, 2, 2)
    with db.write() as conn:
        assert mark_succeeded(conn, lease_of(again), 1, now=T + timedelta(seconds=11))
    assert _claim(db, 1, now=T + timedelta(days=1)) == []


def test_extend_leases_only_renews_live_leases_of_the_owner(db: Database) -> None:
    _enqueue(db, 3)
    with db.write() as conn:
        (lapsing,) = claim_due(conn, "a", 1, lease_seconds=5, now=T)
        (live,) = claim_due(conn, "a", 1, lease_seconds=LEASE, now=T)
        (theirs,) = claim_due(conn, "b", 1, lease_seconds=LEASE, now=T)
    now = T + timedelta(seconds=10)
    with db.write() as conn:
        kept = extend_leases(
            conn, "a", [live.id, lapsing.id, theirs.id, "no-such-task"], lease_seconds=60, now=now
        )
    assert kept == {live.id}
    with db.read() as conn:
        assert get_task(conn, live.id).lease_expires_at == now + timedelta(seconds=60)
        assert get_task(conn, lapsing.id).lease_expires_at == T + timedelta(seconds=5)
        assert get_task(conn, theirs.id).lease_expires_at == T + timedelta(seconds=LEASE)
    with db.write() as conn:
        # A lease that ends exactly now has lapsed too.
        assert (
            extend_leases(
                conn, "b", [theirs.id], lease_seconds=60, now=T + timedelta(seconds=LEASE)
            )
            == set()
        )
        assert extend_leases(conn, "a", [], lease_seconds=60, now=now) == set()


def test_extend_leases_ignores_tasks_that_are_no_longer_running(db: Database) -> None:
    _enqueue(db, 1)
    (task,) = _claim(db, 1, owner="a")
    with db.write() as conn:
        assert release(conn, [lease_of(task)], now=T + timedelta(seconds=1)) == 1
        assert extend_leases(conn, "a", [task.id], lease_seconds=60, now=T) == set()


def test_release_requeues_without_counting_the_attempt(db: Database) -> None:
    _enqueue(db, 2)
    kept, given_back = _claim(db, 2, owner="a")
    stop = T + timedelta(seconds=3)
    with db.write() as conn:
        assert release(conn, [lease_of(given_back)], now=stop) == 1
    with db.read() as conn:
        task = get_task(conn, given_back.id)
        (attempt,) = list_attempts(conn, given_back.id)
        assert get_task(conn, kept.id).status is TaskStatus.RUNNING
    assert task.status is TaskStatus.QUEUED
    assert task.attempts == 0
    assert task.scheduled_at == stop
    assert (task.lease_owner, task.lease_expires_at) == (None, None)
    assert task.finished_at is None
    assert attempt.outcome is AttemptOutcome.RELEASED
    assert attempt.finished_at == stop
    (again,) = _claim(db, 1, owner="b", now=stop)
    assert (again.id, again.attempts, again.lease_token) == (given_back.id, 1, 2)
    with db.read() as conn:
        numbers = [(a.number, a.outcome) for a in list_attempts(conn, given_back.id)]
    assert numbers == [(1, AttemptOutcome.RELEASED), (1, None)]


def test_release_ignores_a_lease_no_longer_held(db: Database) -> None:
    _enqueue(db, 1)
    (task,) = _claim(db, 1, owner="a")
    with db.write() as conn:
        assert release(conn, [lease_of(task)], now=T) == 1
    (again,) = _claim(db, 1, owner="b")
    with db.write() as conn:
        assert release(conn, [lease_of(task)], now=T) == 0
    with db.read() as conn:
        current = get_task(conn, task.id)
        attempts = list_attempts(conn, task.id)
    assert as_claimed(current) == again
    assert [(a.number, a.outcome) for a in attempts] == [(1, AttemptOutcome.RELEASED), (1, None)]
