"""Rate limits in the runner: `BACKSTOP_RATE_LIMITS`, a limited queue that never holds up
the others, and a runner that wakes when a window reopens rather than at its next poll.
(Two worker processes under one limit: tests/e2e/test_rate_limits.py.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.backstop import Backstop
from app.cli.commands import main
from app.main import create_app
from app.settings import Settings, parse_rate_limits
from store import tasks as store_tasks
from store.attempts import list_attempts
from store.models import TaskStatus
from store.ratelimits import RateLimit
from tests.support.backstops import MakeBackstop
from tests.support.waiting import wait_until

BACKSTOP = str(Path(sys.executable).parent / "backstop")
POLL = 30.0  # the runner's poll: far beyond every deadline below


def test_rate_limits_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKSTOP_RATE_LIMITS", "email=4/10s, sms=100/1m,push=3/500ms,, x=1/h")

    assert Settings().rate_limits == {
        "email": RateLimit(4, timedelta(seconds=10)),
        "sms": RateLimit(100, timedelta(minutes=1)),
        "push": RateLimit(3, timedelta(milliseconds=500)),
        "x": RateLimit(1, timedelta(hours=1)),
    }
    assert [str(rate) for rate in Settings().rate_limits.values()] == [
        "4/10s",
        "100/1m",
        "3/500ms",
        "1/1h",
    ]
    assert Settings(rate_limits={"email": "2/1.5s"}).rate_limits == {
        "email": RateLimit(2, timedelta(seconds=1.5))
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("email", "rate limit entry 'email': expected queue=starts/period, e.g. email=4/10s"),
        ("=4/1s", "rate limit entry '=4/1s': expected queue=starts/period"),
        ("email=4", "queue 'email': rate '4' is not starts/period, e.g. 4/10s"),
        ("email=x/1s", "queue 'email': starts 'x' is not a whole number of at least 1"),
        ("email=0/1s", "queue 'email': starts '0' is not a whole number of at least 1"),
        ("email=4/10d", "queue 'email': period '10d' is not a duration like 500ms, 10s, 1m or 1h"),
        ("email=4/0s", "queue 'email': period '0s' is not a duration"),
        ("email=4/-1m", "queue 'email': period '-1m' is not a duration"),
        ("email=4/nanh", "queue 'email': period 'nanh' is not a duration"),
        ("email=4/1e300h", "queue 'email': period '1e300h' is not a duration"),
        # A timedelta, but the window's start (now minus it) is before year 1: every claim
        # and every read of the queue's use would fail on it.
        ("email=4/1e8h", "queue 'email': period '1e8h' is longer than 8784h"),
        ("email=4/8785h", "queue 'email': period '8785h' is longer than 8784h"),
        ("email=1/s,email=2/s", "queue 'email' has two rate limits"),
    ],
)
def test_a_bad_rate_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate_limits(text)
    monkeypatch.setenv("BACKSTOP_RATE_LIMITS", text)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_worker_refuses_a_bad_rate_limit_with_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.update(BACKSTOP_DATA_DIR=str(data_dir), BACKSTOP_RATE_LIMITS="email=4/10s,sms=5/10x")

    done = subprocess.run(
        [BACKSTOP, "worker"], env=env, capture_output=True, text=True, timeout=30, check=False
    )

    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "backstop: invalid setting BACKSTOP_RATE_LIMITS: Value error, queue 'sms':"
        " period '10x' is not a duration like 500ms, 10s, 1m or 1h"
    ]
    assert not data_dir.exists()


def _statuses(backstop: Backstop, task_ids: list[str]) -> list[TaskStatus]:
    with backstop.db.read() as conn:
        return [task.status for task in store_tasks.get_tasks(conn, task_ids)]


def _starts(backstop: Backstop, task_ids: list[str]) -> int:
    with backstop.db.read() as conn:
        return sum(len(list_attempts(conn, task_id)) for task_id in task_ids)


def _run(backstop: Backstop, until: str, done: object) -> None:
    """Start the runner, wait (with a deadline) for `done()`, stop it."""

    async def scenario() -> None:
        await backstop.runner.start()
        try:
            await asyncio.to_thread(wait_until, done, 15.0, until)  # type: ignore[arg-type]
        finally:
            await backstop.runner.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("queues", [{}, {"email": 2, "default": 2}], ids=["any", "named"])
def test_a_limited_queue_never_delays_the_others(
    make_backstop: MakeBackstop, queues: dict[str, int]
) -> None:
    """The email queue may start one task an hour: its others wait, and every task of the
    other queue runs meanwhile, whether the runner serves any queue or names its queues."""
    backstop = make_backstop(
        queues=queues, concurrency=2, rate_limits={"email": RateLimit(1, timedelta(hours=1))}
    )
    # The email tasks are older, so first in line of a claim that did not leave them out.
    emails = [backstop.tasks.add_task("test.echo", n, queue="email") for n in range(6)]
    others = [backstop.tasks.add_task("test.echo", n) for n in range(12)]

    _run(
        backstop,
        "every task of the default queue to succeed",
        lambda: set(_statuses(backstop, others)) == {TaskStatus.SUCCEEDED},
    )

    assert _starts(backstop, emails) == 1
    assert sorted(_statuses(backstop, emails)) == [TaskStatus.QUEUED] * 5 + [TaskStatus.SUCCEEDED]


def test_the_runner_wakes_when_the_window_reopens(make_backstop: MakeBackstop) -> None:
    """Two starts a second, six tasks, and a poll far beyond the deadline: only the wake-up
    at each reopening gets them all run in time."""
    backstop = make_backstop(
        poll_interval=POLL, rate_limits={"email": RateLimit(2, timedelta(seconds=1))}
    )
    emails = [backstop.tasks.add_task("test.echo", n, queue="email") for n in range(6)]

    _run(
        backstop,
        "every email task to succeed",
        lambda: set(_statuses(backstop, emails)) == {TaskStatus.SUCCEEDED},
    )

    assert _starts(backstop, emails) == 6


def test_the_test_kits_drain_stops_at_the_limit(make_backstop: MakeBackstop) -> None:
    backstop = make_backstop(rate_limits={"email": RateLimit(2, timedelta(minutes=1))})
    emails = [backstop.tasks.add_task("test.echo", n, queue="email") for n in range(3)]
    other = backstop.tasks.add_task("test.echo", 9)

    ran = asyncio.run(backstop.runner.drain())

    assert len([task for task in ran if task.queue == "email"]) == 2
    assert other in {task.id for task in ran}
    assert sorted(_statuses(backstop, emails)).count(TaskStatus.QUEUED) == 1


def test_stats_and_metrics_show_each_limit_and_its_use(
    make_backstop: MakeBackstop,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    limits = "email=2/1h,sms=5/10s"
    backstop = make_backstop(rate_limits=parse_rate_limits(limits))
    emails = [backstop.tasks.add_task("test.echo", n, queue="email") for n in range(3)]
    asyncio.run(backstop.runner.drain())
    with backstop.db.read() as conn:
        first = min(a.started_at for task_id in emails for a in list_attempts(conn, task_id))

    with TestClient(create_app(backstop.settings, run_worker=False)) as client:
        shown = client.get("/tasks/stats").json()["rate_limits"]
        metrics = client.get("/metrics").text.splitlines()

    assert shown == {
        "email": {
            "limit": "2/1h",
            "starts": 2,
            "period_seconds": 3600.0,
            "started": 2,
            "reopens_at": (first + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
        },
        "sms": {
            "limit": "5/10s",
            "starts": 5,
            "period_seconds": 10.0,
            "started": 0,
            "reopens_at": None,
        },
    }
    assert {
        'backstop_queue_rate_limit_starts{queue="email"} 2.0',
        'backstop_queue_rate_limit_period_seconds{queue="email"} 3600.0',
        'backstop_queue_rate_started{queue="email"} 2.0',
        'backstop_queue_rate_started{queue="sms"} 0.0',
    } <= set(metrics)
    for key in [key for key in os.environ if key.startswith("BACKSTOP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BACKSTOP_DATA_DIR", str(backstop.settings.data_dir))
    monkeypatch.setenv("BACKSTOP_RATE_LIMITS", limits)
    capsys.readouterr()
    main(["tasks", "stats"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2:] == [
        "queue email: at most 2/1h, 2 started in the last 1h 00m; next start at "
        + (first + timedelta(hours=1)).isoformat(timespec="milliseconds"),
        "queue sms: at most 5/10s, 0 started in the last 10.0s",
    ]
