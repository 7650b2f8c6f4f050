"""The runner: retries on the policy's schedule, timeouts, wake-ups, graceful stop, leases."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from app.backstop import Backstop
from app.runner import pipeline
from app.runner.runner import Runner
from store import attempts as store_attempts
from store import leases
from store import outcomes as store_outcomes
from store import tasks as store_tasks
from store.engine import Database
from store.models import Attempt, AttemptOutcome, Claim, Task, TaskStatus
from store.tasks import NewTask
from store.timeutil import utcnow
from tests.support.backstops import MakeBackstop
from tests.support.tasks import flaky
from tests.support.waiting import wait_until

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """`seconds` after the pinned start of the test's clock."""
    return T0 + timedelta(seconds=seconds)


def _task(backstop: Backstop, task_id: str) -> Task:
    with backstop.db.read() as conn:
        return store_tasks.get_task(conn, task_id)


def _attempts(backstop: Backstop, task_id: str) -> list[Attempt]:
    with backstop.db.read() as conn:
        return store_attempts.list_attempts(conn, task_id)


def _marks(backstop: Backstop, folder: str, task_id: str) -> list[str]:
    """The lines a test task wrote about itself (see `tests.support.tasks._mark`)."""
    path = Path(backstop.settings.data_dir) / folder / f"{task_id}.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


async def _until(predicate: Callable[[], bool], what: str, within: float = 15.0) -> None:
    """Poll `predicate` without blocking the loop; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


def _status_is(backstop: Backstop, task_id: str, status: TaskStatus) -> Callable[[], bool]:
    return lambda: _task(backstop, task_id).status == status


# -- retries on the policy's schedule --------------------------------------------------------


def test_flaky_task_is_retried_exactly_after_the_policy_wait_until_it_succeeds(
    backstop: Backstop,
) -> None:
    task = backstop.tasks.enqueue(flaky, [2], now=T0)
    runner = backstop.runner

    async def scenario() -> None:
        first = await runner.run_once(now=at(0))
        assert [(t.status, t.attempts, t.scheduled_at) for t in first] == [
            (TaskStatus.RETRYING, 1, at(2))
        ]
        assert await runner.run_once(now=at(1)) == []
        second = await runner.run_once(now=at(2))
        assert [(t.status, t.attempts, t.scheduled_at) for t in second] == [
            (TaskStatus.RETRYING, 2, at(4))
        ]
        assert await runner.run_once(now=at(3.999)) == []
        third = await runner.run_once(now=at(4))
        assert [(t.status, t.attempts, t.result, t.finished_at) for t in third] == [
            (TaskStatus.SUCCEEDED, 3, 3, at(4))
        ]
        assert await runner.drain(now=at(100)) == []

    asyncio.run(scenario())

    history = _attempts(backstop, task.id)
    assert [(a.number, a.outcome, a.error) for a in history] == [
        (1, AttemptOutcome.FAILED, "Flaky: attempt 1 of 2 planned failures"),
        (2, AttemptOutcome.FAILED, "Flaky: attempt 2 of 2 planned failures"),
        (3, AttemptOutcome.SUCCEEDED, None),
    ]
    assert [(a.started_at, a.finished_at) for a in history] == [
        (at(0), at(0)),
        (at(2), at(2)),
        (at(4), at(4)),
    ]
    assert all(a.worker == runner.worker_id for a in history)
    assert _marks(backstop, "attempts", task.id) == ["1", "2", "3"]


def test_non_retryable_error_fails_at_once_with_its_traceback(backstop: Backstop) -> None:
    task = backstop.tasks.enqueue("test.fatal", now=T0)

    done = asyncio.run(backstop.runner.drain(now=at(0)))
    later = asyncio.run(backstop.runner.drain(now=at(3600)))

    assert [(t.status, t.attempts, t.last_error, t.finished_at) for t in done] == [
        (TaskStatus.FAILED, 1, "Fatal: not worth retrying", at(0))
    ]
    assert later == []
    [attempt] = _attempts(backstop, task.id)
    assert attempt.outcome == AttemptOutcome.FAILED
    assert attempt.error == "Fatal: not worth retrying"
    assert attempt.traceback is not None
    assert attempt.traceback.startswith("Traceback (most recent call last):")
    assert 'raise Fatal("not worth retrying")' in attempt.traceback
    assert attempt.traceback.rstrip().endswith("Fatal: not worth retrying")


@pytest.mark.parametrize("name", ["test.slow_timeout", "test.async_slow_timeout"])
def test_timeout_counts_as_a_failed_attempt(backstop: Backstop, name: str) -> None:
    task = backstop.tasks.enqueue(name, now=T0)

    done = asyncio.run(backstop.runner.drain(now=at(0)))

    [finished] = done
    assert (finished.id, finished.status, finished.attempts) == (task.id, TaskStatus.FAILED, 2)
    assert finished.last_error is not None
    assert finished.last_error.startswith("TaskTimeout: timed out after 0.2s")
    history = _attempts(backstop, task.id)
    assert [a.outcome for a in history] == [AttemptOutcome.FAILED] * 2
    assert all((a.error or "").startswith("TaskTimeout: timed out after 0.2s") for a in history)


# -- running sync and async functions --------------------------------------------------------


@pytest.mark.parametrize("name", ["test.whoami", "test.async_whoami"])
def test_functions_receive_their_context(backstop: Backstop, name: str) -> None:
    task_id = backstop.tasks.add_task(name)

    [finished] = asyncio.run(backstop.runner.drain())

    assert finished.status == TaskStatus.SUCCEEDED
    assert finished.result == {"task_id": task_id, "attempt": 1}


@pytest.mark.parametrize("name", ["test.echo", "test.async_echo"])
def test_sync_and_async_results_are_stored_as_json(backstop: Backstop, name: str) -> None:
    task_id = backstop.tasks.add_task(name, 41)

    asyncio.run(backstop.runner.drain())

    stored = _task(backstop, task_id)
    assert (stored.status, stored.result, stored.attempts) == (
        TaskStatus.SUCCEEDED,
        {"value": 41, "attempt": 1},
        1,
    )
    assert stored.finished_at is not None
    assert stored.lease_owner is None


def test_results_json_has_no_type_for_are_converted(backstop: Backstop) -> None:
    task_id = backstop.tasks.add_task("test.rich")

    asyncio.run(backstop.runner.drain())

    assert _task(backstop, task_id).result == {
        "at": "2030-01-02T03:04:05Z",
        "pair": [1, 2],
        "one": ["x"],
    }


def test_drain_runs_more_tasks_than_one_claim_takes(backstop: Backstop) -> None:
    count = backstop.settings.concurrency * 2 + 1
    ids = {backstop.tasks.enqueue("test.echo", [n], now=T0).id for n in range(count)}

    done = asyncio.run(backstop.runner.drain(now=at(0)))

    assert {t.id for t in done} == ids
    assert {t.status for t in done} == {TaskStatus.SUCCEEDED}


def test_higher_priority_is_claimed_first(make_backstop: MakeBackstop) -> None:
    backstop = make_backstop(concurrency=1)
    low = backstop.tasks.enqueue("test.noop", now=T0).id
    high = backstop.tasks.enqueue("test.noop", priority=5, now=at(1)).id

    first = asyncio.run(backstop.runner.run_once(now=at(2)))
    second = asyncio.run(backstop.runner.run_once(now=at(2)))

    assert [t.id for t in first] == [high]
    assert [t.id for t in second] == [low]


# -- the started runner ----------------------------------------------------------------------


def test_started_runner_picks_up_a_local_enqueue_without_waiting_for_a_poll(
    make_backstop: MakeBackstop,
) -> None:
    backstop = make_backstop(poll_interval=60)

    async def scenario() -> None:
        # Picked up by the claim the runner makes as it starts; after it, polls are 60 s apart.
        warmup = backstop.tasks.add_task("test.noop")
        await backstop.runner.start()
        try:
            await _until(_status_is(backstop, warmup, TaskStatus.SUCCEEDED), "the first claim")
            on_loop = backstop.tasks.add_task("test.echo", 1)
            await _until(
                _status_is(backstop, on_loop, TaskStatus.SUCCEEDED), "an enqueue on the loop", 10
            )
            from_thread = await asyncio.to_thread(backstop.tasks.add_task, "test.echo", 2)
            await _until(
                _status_is(backstop, from_thread, TaskStatus.SUCCEEDED),
                "an enqueue from another thread",
                10,
            )
        finally:
            await backstop.runner.stop()

    asyncio.run(scenario())


def test_started_runner_picks_up_another_process_enqueue_without_waiting_for_a_poll(
    make_backstop: MakeBackstop,
) -> None:
    backstop = make_backstop(poll_interval=60)
    elsewhere = Database.from_url(backstop.settings.url)  # no wake: only the doorbell tells

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            for n in range(3):  # also after claims that ran dry
                with elsewhere.write() as conn:
                    task = store_tasks.enqueue(conn, NewTask(name="test.echo", args=[n]))
                await _until(
                    _status_is(backstop, task.id, TaskStatus.SUCCEEDED), "the doorbell", 10
                )
        finally:
            await backstop.runner.stop()
            elsewhere.dispose()

    asyncio.run(scenario())


def test_stop_past_the_grace_releases_the_running_task(make_backstop: MakeBackstop) -> None:
    backstop = make_backstop(shutdown_grace=0.2)

    async def scenario() -> str:
        await backstop.runner.start()
        try:
            task_id = backstop.tasks.add_task("test.sleep", 5)
            await _until(lambda: _marks(backstop, "runs", task_id) == ["start 1"], "the start")
        finally:
            await backstop.runner.stop()
        return task_id

    task_id = asyncio.run(scenario())

    released = _task(backstop, task_id)
    assert (released.status, released.attempts, released.lease_owner) == (
        TaskStatus.QUEUED,
        0,
        None,
    )
    [attempt] = _attempts(backstop, task_id)
    assert attempt.outcome == AttemptOutcome.RELEASED
    assert attempt.finished_at is not None
    # The sync function saw the stop through its context and returned early.
    wait_until(lambda: _marks(backstop, "runs", task_id) == ["start 1", "done 1"], 5, "the end")


def test_stop_within_the_grace_lets_the_running_task_finish(make_backstop: MakeBackstop) -> None:
    backstop = make_backstop(shutdown_grace=10)

    async def scenario() -> str:
        await backstop.runner.start()
        try:
            task_id = backstop.tasks.add_task("test.sleep", 0.3)
            await _until(lambda: _marks(backstop, "runs", task_id) == ["start 1"], "the start")
        finally:
            await backstop.runner.stop()
        return task_id

    task_id = asyncio.run(scenario())

    finished = _task(backstop, task_id)
    assert (finished.status, finished.attempts, finished.result) == (
        TaskStatus.SUCCEEDED,
        1,
        0.3,
    )
    assert [a.outcome for a in _attempts(backstop, task_id)] == [AttemptOutcome.SUCCEEDED]
    assert _marks(backstop, "runs", task_id) == ["start 1", "done 1"]
    successor = Runner(backstop.db, backstop.registry, backstop.settings)
    assert asyncio.run(successor.drain()) == []


def test_heartbeat_keeps_extending_the_lease_while_the_function_runs(
    make_backstop: MakeBackstop,
) -> None:
    # A 1 s lease, renewed every third of a second, around a function that runs 1.5 s.
    backstop = make_backstop(lease_seconds=1.0)

    async def scenario() -> tuple[str, datetime, datetime]:
        await backstop.runner.start()
        try:
            task_id = backstop.tasks.add_task("test.sleep", 1.5)
            await _until(_status_is(backstop, task_id, TaskStatus.RUNNING), "the claim")
            first = _task(backstop, task_id).lease_expires_at
            assert first is not None

            def extended() -> bool:
                current = _task(backstop, task_id).lease_expires_at
                return current is not None and current > first

            await _until(extended, "a renewed lease", 5)
            renewed = _task(backstop, task_id).lease_expires_at
            assert renewed is not None
            await _until(_status_is(backstop, task_id, TaskStatus.SUCCEEDED), "the success")
        finally:
            await backstop.runner.stop()
        return task_id, first, renewed

    task_id, first, renewed = asyncio.run(scenario())

    assert renewed > first
    finished = _task(backstop, task_id)
    assert finished.attempts == 1
    assert [a.outcome for a in _attempts(backstop, task_id)] == [AttemptOutcome.SUCCEEDED]
    assert _marks(backstop, "runs", task_id) == ["start 1", "done 1"]


# -- leases of dead runners ------------------------------------------------------------------


def _claim_for_a_dead_runner(backstop: Backstop, lease_seconds: float) -> Claim:
    with backstop.db.write() as conn:
        [claimed] = leases.claim_due(conn, "dead", 10, lease_seconds=lease_seconds, now=at(0))
    return claimed


def test_runner_reclaims_an_expired_lease_as_a_failed_attempt(backstop: Backstop) -> None:
    task = backstop.tasks.enqueue("test.echo", [7], now=T0)
    _claim_for_a_dead_runner(backstop, lease_seconds=1)

    asyncio.run(backstop.runner.reclaim(now=at(0.5)))
    assert _task(backstop, task.id).status == TaskStatus.RUNNING

    asyncio.run(backstop.runner.reclaim(now=at(1)))
    reclaimed = _task(backstop, task.id)
    assert (reclaimed.status, reclaimed.attempts, reclaimed.last_error) == (
        TaskStatus.RETRYING,
        1,
        "lease expired",
    )
    assert reclaimed.lease_owner is None
    # The default policy: 1 s, plus up to 1 s of jitter, after the reclaim.
    assert at(2) <= reclaimed.scheduled_at <= at(3)
    [attempt] = _attempts(backstop, task.id)
    assert (attempt.worker, attempt.outcome, attempt.error, attempt.finished_at) == (
        "dead",
        AttemptOutcome.LEASE_EXPIRED,
        "lease expired",
        at(1),
    )

    [rerun] = asyncio.run(backstop.runner.drain(now=at(3)))
    assert (rerun.status, rerun.result) == (TaskStatus.SUCCEEDED, {"value": 7, "attempt": 2})


def test_reclaim_of_the_last_allowed_attempt_fails_the_task(backstop: Backstop) -> None:
    task = backstop.tasks.enqueue("test.echo", [7], max_attempts=1, now=T0)
    _claim_for_a_dead_runner(backstop, lease_seconds=1)

    asyncio.run(backstop.runner.reclaim(now=at(5)))

    failed = _task(backstop, task.id)
    assert (failed.status, failed.attempts, failed.last_error, failed.finished_at) == (
        TaskStatus.FAILED,
        1,
        "lease expired",
        at(5),
    )
    assert asyncio.run(backstop.runner.drain(now=at(3600))) == []


def test_drain_does_not_run_a_task_another_runner_holds(backstop: Backstop) -> None:
    task = backstop.tasks.enqueue("test.echo", [7], now=T0)
    _claim_for_a_dead_runner(backstop, lease_seconds=30)

    assert asyncio.run(backstop.runner.drain(now=at(1))) == []
    assert _task(backstop, task.id).lease_owner == "dead"


# -- outcomes the database refuses ------------------------------------------------------------


def test_outcomes_whose_transaction_fails_are_written_again_each_on_its_own(
    make_backstop: MakeBackstop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle's transaction fails once: its outcomes are retried alone, none is lost."""
    backstop = make_backstop()
    real_record = store_outcomes.record
    failures: list[int] = []

    def flaky_record(conn: Any, outcomes: list[Any]) -> Any:
        if outcomes and not failures:
            failures.append(len(outcomes))
            raise OperationalError("UPDATE task", None, Exception("disk I/O error"))
        return real_record(conn, outcomes)

    monkeypatch.setattr(store_outcomes, "record", flaky_record)
    ids = [backstop.tasks.add_task("test.echo", n) for n in range(5)]

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await _until(
                lambda: all(_task(backstop, i).status == TaskStatus.SUCCEEDED for i in ids),
                "every task to succeed",
            )
        finally:
            await backstop.runner.stop()

    asyncio.run(scenario())

    assert failures, "the failure was never injected"
    assert [len(_attempts(backstop, i)) for i in ids] == [1] * 5
    assert [_task(backstop, i).result["value"] for i in ids] == list(range(5))


def test_an_outcome_that_cannot_be_written_is_kept_past_its_lease_and_written_once_it_can(
    make_backstop: MakeBackstop, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The database takes no heartbeat, so the lease lapses while the function runs, then
    refuses its outcome: the runner keeps the task (no reclaim takes it) and, once writes
    work again, renews the lease and writes the outcome. The function ran once."""
    backstop = make_backstop(concurrency=1, lease_seconds=1)
    monkeypatch.setattr(pipeline, "RECORD_RETRIES", (0.01, 0.05))
    gate = tmp_path / "gate"
    held = backstop.tasks.add_task("test.gate", str(gate))
    refused: list[int] = []
    healed = threading.Event()
    real_record = store_outcomes.record

    def refuse_until_healed(conn: Any, outcomes: list[Any]) -> Any:
        if outcomes and not healed.is_set():
            refused.append(len(outcomes))
            raise OperationalError("UPDATE task", None, Exception("database or disk is full"))
        return real_record(conn, outcomes)

    monkeypatch.setattr(store_outcomes, "record", refuse_until_healed)
    monkeypatch.setattr(backstop.runner, "_heartbeat", _failing_heartbeat(backstop))

    def lapsed() -> bool:
        task = _task(backstop, held)
        expires = task.lease_expires_at
        return task.status == TaskStatus.RUNNING and expires is not None and expires < utcnow()

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await _until(lapsed, "the lease to lapse while the function runs")
            gate.touch()
            await _until(lambda: bool(refused), "the outcome to be refused")
            assert await backstop.runner.reclaim() == []
            assert _task(backstop, held).status == TaskStatus.RUNNING
            healed.set()
            await _until(_status_is(backstop, held, TaskStatus.SUCCEEDED), "the outcome")
        finally:
            await backstop.runner.stop()

    asyncio.run(scenario())

    assert [attempt.outcome for attempt in _attempts(backstop, held)] == [AttemptOutcome.SUCCEEDED]
    assert (tmp_path / "data" / "runs" / f"{held}.txt").read_text().split("\n")[:2] == [
        "start 1",
        "done 1",
    ]


def _failing_heartbeat(backstop: Backstop) -> Callable[[], Awaitable[None]]:
    """A heartbeat that never gets through, as on a full disk: its leases are in doubt."""

    async def heartbeat() -> None:
        backstop.runner.pipeline.leases_in_doubt = True

    return heartbeat


@pytest.mark.parametrize("name", ["test.async_escape", "test.escape", "test.unprintable"])
def test_an_attempt_that_ends_oddly_is_still_recorded_and_frees_its_slot(
    make_backstop: MakeBackstop, name: str
) -> None:
    """A BaseException that is not an Exception, or an exception that cannot be printed:
    the attempt fails like any other, and the runner's only slot goes to the next task."""
    backstop = make_backstop(concurrency=1)
    odd = backstop.tasks.add_task(name)
    after = backstop.tasks.add_task("test.echo", 1)

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await _until(_status_is(backstop, after, TaskStatus.SUCCEEDED), "the next task")
        finally:
            await backstop.runner.stop()

    asyncio.run(scenario())

    failed = _task(backstop, odd)
    assert failed.status == TaskStatus.FAILED
    assert failed.last_error is not None
    assert failed.last_error.startswith(("Escape: out of band", "Unprintable"))


def test_a_thread_that_cannot_start_fails_the_attempt_instead_of_holding_it(
    make_backstop: MakeBackstop, monkeypatch: pytest.MonkeyPatch
) -> None:
    backstop = make_backstop()
    task_id = backstop.tasks.add_task("test.echo", 1)

    def refuse(*_args: Any) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(backstop.runner.threads, "submit", refuse)

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await _until(_status_is(backstop, task_id, TaskStatus.RETRYING), "the failure")
        finally:
            await backstop.runner.stop()

    asyncio.run(scenario())

    assert _task(backstop, task_id).last_error == "RuntimeError: can't start new thread"
    assert backstop.runner.pipeline.running == {}


def test_a_stopped_runner_releases_tasks_whose_outcome_waits_for_a_retry_and_writes_no_more(
    make_backstop: MakeBackstop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome could not be written before the stop: the task goes back to the queue,
    and no retry of the write outlives the runner."""
    backstop = make_backstop()
    task_id = _stop_while_an_outcome_waits(backstop, monkeypatch)

    released = _task(backstop, task_id)
    assert (released.status, released.attempts) == (TaskStatus.QUEUED, 0)
    assert not backstop.runner.pipeline._timers
    assert backstop.runner.database.submit(lambda: None) is False


def test_a_runner_that_cannot_release_its_tasks_still_stops(
    make_backstop: MakeBackstop, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The database takes neither the outcome nor the release: the stop says so in a line
    and ends; the task is left to its lease, for a reclaim to take."""
    backstop = make_backstop()

    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("UPDATE task", None, Exception("database or disk is full"))

    monkeypatch.setattr(leases, "release", full)
    task_id = _stop_while_an_outcome_waits(backstop, monkeypatch)

    assert _task(backstop, task_id).status == TaskStatus.RUNNING
    assert backstop.runner.pipeline.running == {}
    assert any("could not release 1 unfinished tasks" in r.getMessage() for r in caplog.records)


def _stop_while_an_outcome_waits(backstop: Backstop, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a task whose outcome the database refuses, and stop the runner while the write
    waits for its retry; the task's id."""
    monkeypatch.setattr(pipeline, "RECORD_RETRIES", (60.0,))

    def refuse(conn: Any, outcomes: list[Any]) -> Any:
        if outcomes:
            raise OperationalError("UPDATE task", None, Exception("database is locked"))
        return []

    monkeypatch.setattr(store_outcomes, "record", refuse)
    task_id = backstop.tasks.add_task("test.echo", 1)

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await _until(lambda: bool(backstop.runner.pipeline._timers), "a retry to wait")
        finally:
            await backstop.runner.stop()

    asyncio.run(scenario())
    return task_id


def test_an_inline_runner_cannot_be_started(backstop: Backstop) -> None:
    runner = Runner(backstop.db, backstop.registry, backstop.settings, inline=True)
    with pytest.raises(RuntimeError, match="inline"):
        asyncio.run(runner.start())
