"""A database that cannot be reached: every runner loop logs one line, backs off, and
carries on by itself once it is back."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from app.runner import pipeline
from app.runner.backoff import Backoff
from store.models import TaskStatus
from store.tasks import get_task
from tests.support.backstops import MakeBackstop
from tests.support.waiting import wait_until

UNREACHABLE = OperationalError("SELECT", None, Exception("connection refused\nDETAIL: more"))


def test_pauses_double_up_to_the_cap_and_start_over_after_a_success() -> None:
    backoff = Backoff("x", first=0.1, cap=1.0)

    pauses = [backoff.failed(UNREACHABLE, now=0.0) for _ in range(6)]

    assert pauses == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert not backoff.ready(now=0.5)
    assert backoff.ready(now=1.0)
    backoff.succeeded()
    assert backoff.ready(now=0.0)
    assert backoff.failed(UNREACHABLE, now=0.0) == 0.1


def test_a_row_of_failures_logs_one_line_and_the_recovery_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backoff = Backoff("runner w: claim")
    with caplog.at_level(logging.INFO, logger="app.runner.backoff"):
        for _ in range(5):
            backoff.failed(UNREACHABLE, now=0.0)
        backoff.succeeded()

    assert [r.getMessage() for r in caplog.records] == [
        "runner w: claim failed (Exception: connection refused); trying again with back-off,"
        " at most 5s apart",
        "runner w: claim works again after 5 failed tries",
    ]
    assert caplog.records[0].exc_info is None  # the database's error: no traceback


def test_a_claim_that_fails_backs_off_and_the_runner_goes_on_once_it_works(
    make_backstop: MakeBackstop,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backstop = make_backstop(poll_interval=0.01)
    real_claim = pipeline.claim_queues
    tries: list[float] = []

    def unreachable_four_times(*args: Any, **kwargs: Any) -> Any:
        tries.append(time.monotonic())
        if len(tries) <= 4:
            raise UNREACHABLE
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(pipeline, "claim_queues", unreachable_four_times)
    task_id = backstop.tasks.add_task("test.echo", 7)

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await asyncio.to_thread(
                wait_until, lambda: _status(backstop, task_id) == TaskStatus.SUCCEEDED
            )
        finally:
            await backstop.runner.stop()

    with caplog.at_level(logging.INFO, logger="app.runner"):
        asyncio.run(scenario())

    lines = [r.getMessage() for r in caplog.records if r.name == "app.runner.backoff"]
    # Polled every 10 ms, each try still waited out its back-off (a lower bound: a slow
    # machine only waits longer), and the four failures took one line.
    assert _gaps(tries[:5]) >= [0.1, 0.2, 0.4, 0.8]
    assert len(lines) == 2, lines
    assert "claim failed (Exception: connection refused)" in lines[0]
    assert lines[1].endswith("claim works again after 4 failed tries")


def test_a_failing_interval_job_is_logged_once_and_retried_with_back_off(
    make_backstop: MakeBackstop, caplog: pytest.LogCaptureFixture
) -> None:
    backstop = make_backstop(poll_interval=0.01)
    calls: list[float] = []

    async def flaky_job() -> None:
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise UNREACHABLE

    backstop.runner.add_job("flaky", flaky_job, 0.01)

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await asyncio.to_thread(wait_until, lambda: len(calls) >= 4)
        finally:
            await backstop.runner.stop()

    with caplog.at_level(logging.INFO, logger="app.runner.backoff"):
        asyncio.run(scenario())

    lines = [r.getMessage() for r in caplog.records if "flaky" in r.getMessage()]
    assert _gaps(calls[:4]) >= [0.1, 0.2, 0.4]
    assert len(lines) == 2, lines
    assert "flaky failed (Exception: connection refused)" in lines[0]
    assert lines[1].endswith("flaky works again after 3 failed tries")


def _gaps(times: list[float]) -> list[float]:
    """The pauses between consecutive tries, a little rounded down (timer resolution)."""
    return [round(b - a, 2) for a, b in itertools.pairwise(times)]


def _status(backstop: Any, task_id: str) -> TaskStatus:
    with backstop.db.read() as conn:
        return TaskStatus(get_task(conn, task_id).status)
