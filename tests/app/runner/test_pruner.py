"""Retention in the service: the Pruner, its periodic job, and `GET /tasks/stats`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient

from app.backstop import Backstop, open_database
from app.runner.pruner import Pruner
from app.settings import Settings
from store import tasks as store_tasks
from store.models import TaskStatus as S
from store.tasks import NewTask, enqueue_many
from store.timeutil import utcnow
from tests.support.client import service
from tests.support.states import finished, unfinished
from tests.support.tasks import noop
from tests.support.waiting import wait_until

T = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
TICK = timedelta(microseconds=1)
R = TypeVar("R")


def short_ages(backstop: Backstop) -> Settings:
    """The backstop's settings, keeping succeeded and cancelled tasks an hour, failed ones two."""
    return backstop.settings.model_copy(update={"retain_succeeded": 3600, "retain_failed": 7200})


def pruner(backstop: Backstop) -> Pruner:
    """A Pruner on the backstop's runner, with the short ages and no pause between batches."""
    return Pruner(backstop.runner.write, short_ages(backstop), pause=0)


def ids_left(backstop: Backstop, ids: list[str]) -> set[str]:
    with backstop.db.read() as conn:
        return {task.id for task in store_tasks.get_tasks(conn, ids)}


async def until(predicate: Callable[[], bool], what: str, within: float = 15.0) -> None:
    """Poll `predicate` without blocking the loop; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- the Pruner ------------------------------------------------------------------------------


def test_prune_deletes_each_state_past_its_own_age_as_of_now(backstop: Backstop) -> None:
    db = backstop.db
    gone = [
        finished(db, S.SUCCEEDED, T - HOUR - TICK),
        finished(db, S.CANCELLED, T - HOUR - TICK),
        finished(db, S.FAILED, T - 2 * HOUR - TICK),
    ]
    kept = [
        finished(db, S.SUCCEEDED, T - HOUR),
        finished(db, S.CANCELLED, T - HOUR),
        finished(db, S.FAILED, T - 2 * HOUR),
        finished(db, S.FAILED, T - HOUR - TICK),  # past the succeeded age, not the failed
        unfinished(db, S.QUEUED, T - 1000 * HOUR),
        unfinished(db, S.RUNNING, T - 1000 * HOUR),
        unfinished(db, S.RETRYING, T - 1000 * HOUR),
    ]

    pruned = asyncio.run(pruner(backstop).prune(now=T))

    assert pruned == {"succeeded": 1, "cancelled": 1, "failed": 1}
    assert ids_left(backstop, gone + kept) == set(kept)
    assert asyncio.run(pruner(backstop).prune(now=T)) == {
        "succeeded": 0,
        "cancelled": 0,
        "failed": 0,
    }


def test_prune_goes_in_batches_of_its_own_transactions_until_done(backstop: Backstop) -> None:
    old = [finished(backstop.db, S.SUCCEEDED, T - 10 * HOUR) for _ in range(7)]
    old.append(finished(backstop.db, S.FAILED, T - 10 * HOUR))
    calls: list[tuple[S, int]] = []
    results: list[object] = []

    async def write(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        calls.append((args[0], kwargs["limit"]))
        result = await backstop.runner.write(fn, *args, **kwargs)
        results.append(result)
        return result

    pruned = asyncio.run(Pruner(write, short_ages(backstop), batch=3, pause=0).prune(now=T))

    assert pruned == {"succeeded": 7, "cancelled": 0, "failed": 1}
    assert calls == [(S.SUCCEEDED, 3)] * 3 + [(S.CANCELLED, 3), (S.FAILED, 3)]
    assert results == [3, 3, 1, 0, 1]
    assert ids_left(backstop, old) == set()


def test_prune_logs_one_line_when_it_deleted_something_and_none_otherwise(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    finished(backstop.db, S.SUCCEEDED, T - 10 * HOUR)
    finished(backstop.db, S.FAILED, T - 10 * HOUR)
    caplog.set_level(logging.INFO, logger="app.runner.pruner")

    asyncio.run(pruner(backstop).prune(now=T))
    asyncio.run(pruner(backstop).prune(now=T))

    assert [r.getMessage() for r in caplog.records if r.name == "app.runner.pruner"] == [
        "pruned 2 finished tasks past their age (1 succeeded, 1 failed)"
    ]


def test_the_periodic_job_lets_a_failure_through_to_the_runners_back_off(
    backstop: Backstop, caplog: pytest.LogCaptureFixture
) -> None:
    """The runner logs it once and tries again later (tests/app/runner/test_backoff.py)."""

    async def broken(fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        raise RuntimeError("database is gone")

    with pytest.raises(RuntimeError, match="database is gone"):
        asyncio.run(Pruner(broken, backstop.settings).run())
    assert [r for r in caplog.records if r.name == "app.runner.pruner"] == []


def test_the_runner_of_every_backstop_prunes_at_start_and_every_interval(
    settings: Settings,
) -> None:
    backstop = Backstop(settings.model_copy(update={"prune_interval": 0.05}))
    backstop.prepare()
    now = utcnow()
    age = timedelta(seconds=settings.retain_succeeded)
    first = finished(backstop.db, S.SUCCEEDED, now - age - HOUR)
    kept = finished(backstop.db, S.SUCCEEDED, now)

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await until(lambda: ids_left(backstop, [first]) == set(), "the first prune")
            # Finished long ago but stored only now: the next interval's prune takes it.
            later = finished(backstop.db, S.CANCELLED, utcnow() - age - HOUR)
            await until(lambda: ids_left(backstop, [later]) == set(), "a later prune")
        finally:
            await backstop.runner.stop()

    try:
        asyncio.run(scenario())
        assert ids_left(backstop, [kept]) == {kept}
    finally:
        backstop.close()


def test_enqueues_from_other_threads_all_complete_while_5000_tasks_are_pruned(
    backstop: Backstop, settings: Settings
) -> None:
    with backstop.db.write() as conn:
        enqueue_many(conn, [NewTask(name="test.noop") for _ in range(5000)], now=T - 1000 * HOUR)
        conn.exec_driver_sql("UPDATE task SET status = 'succeeded', finished_at = created_at")
    # One enqueuer in this process (the API's path), one on a database of its own, as
    # another process would be: it meets the pruner's batches on SQLite's lock.
    elsewhere = open_database(settings)
    pruning = threading.Event()
    stop = threading.Event()
    enqueued: dict[str, list[str]] = {"here": [], "elsewhere": []}
    during: dict[str, int] = {"here": 0, "elsewhere": 0}
    errors: list[BaseException] = []

    def enqueue_here() -> str:
        return backstop.tasks.add_task(noop)

    def enqueue_elsewhere() -> str:
        with elsewhere.write() as conn:
            return store_tasks.enqueue(conn, NewTask(name="test.noop")).id

    def enqueuer(where: str, enqueue: Callable[[], str]) -> None:
        try:
            while not stop.is_set():
                was_pruning = pruning.is_set()
                enqueued[where].append(enqueue())
                if was_pruning and pruning.is_set():
                    during[where] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=enqueuer, args=("here", enqueue_here)),
        threading.Thread(target=enqueuer, args=("elsewhere", enqueue_elsewhere)),
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: all(enqueued.values()) or bool(errors), what="the first enqueues")

        async def prune() -> dict[str, int]:
            pruning.set()
            try:
                return await Pruner(backstop.runner.write, settings).prune(now=T)
            finally:
                pruning.clear()

        pruned = asyncio.run(prune())
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        elsewhere.dispose()

    assert errors == []
    assert pruned == {"succeeded": 5000, "cancelled": 0, "failed": 0}
    assert during["here"] > 0
    assert during["elsewhere"] > 0
    every = enqueued["here"] + enqueued["elsewhere"]
    with backstop.db.read() as conn:
        counts = store_tasks.count_by_status(conn)
        stored = store_tasks.get_tasks(conn, every)
    assert {task.status for task in stored} == {S.QUEUED}
    assert len(stored) == len(every)
    assert counts[S.SUCCEEDED] == 0


# -- GET /tasks/stats ------------------------------------------------------------------------


def test_stats_of_an_empty_store(client: TestClient) -> None:
    answer = client.get("/tasks/stats")

    assert answer.status_code == 200
    assert answer.json() == {
        "counts": dict.fromkeys(S, 0),
        "queues": {},
        "oldest_due_seconds": None,
        "rate_limits": {},
    }


def test_stats_count_per_state_and_queue_and_age_the_oldest_due_task(client: TestClient) -> None:
    db = service(client).db
    now = utcnow()
    # The tasks that are claimed first: a claim takes any due task of its queue.
    finished(db, S.SUCCEEDED, now - HOUR, queue="default")
    unfinished(db, S.RUNNING, now - 5 * HOUR, queue="default")
    finished(db, S.FAILED, now - 5 * HOUR, queue="email")
    finished(db, S.CANCELLED, now, queue="email")
    unfinished(db, S.RETRYING, now - 3 * HOUR, queue="email", due=now - 90 * timedelta(minutes=1))
    unfinished(db, S.QUEUED, now - 2 * HOUR, queue="default")
    unfinished(db, S.QUEUED, now - 4 * HOUR, queue="default", due=now + HOUR)  # not due yet

    answer = client.get("/tasks/stats")

    assert answer.status_code == 200
    body = answer.json()
    zero = {status.value: 0 for status in S}
    assert body["counts"] == {
        "queued": 2,
        "running": 1,
        "retrying": 1,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert body["queues"] == {
        "default": {**zero, "queued": 2, "running": 1, "succeeded": 1},
        "email": {**zero, "retrying": 1, "failed": 1, "cancelled": 1},
    }
    # The queued task due two hours ago is the oldest due one; the answer is read a moment
    # after `now`, never before it.
    assert 2 * 3600 <= body["oldest_due_seconds"] < 2 * 3600 + 60


def test_stats_say_null_when_nothing_waiting_is_due(client: TestClient) -> None:
    db = service(client).db
    now = utcnow()
    unfinished(db, S.RUNNING, now - HOUR)
    finished(db, S.SUCCEEDED, now - HOUR)
    unfinished(db, S.RETRYING, now - HOUR, due=now + HOUR)
    unfinished(db, S.QUEUED, now - HOUR, due=now + HOUR)
    assert client.post("/tasks", json={"name": "test.noop", "delay": 3600}).status_code == 202

    body = client.get("/tasks/stats").json()

    assert body["counts"]["queued"] == 2
    assert body["oldest_due_seconds"] is None
