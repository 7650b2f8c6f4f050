"""Scheduling and queues: `delay`, `run_at` and `priority` on `POST /tasks` as the claim honours
them, named queues with their own concurrency, and runners that serve only some queues."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.backstop import Backstop
from app.main import create_app
from app.runner.runner import Runner
from app.settings import Settings, parse_queues
from store import tasks as store_tasks
from store.models import TaskStatus
from store.timeutil import utcnow
from tests.support.backstops import MakeBackstop
from tests.support.client import drain
from tests.support.waiting import wait_until

BACKSTOP = str(Path(sys.executable).parent / "backstop")


def enqueue(client: TestClient, name: str, *args: Any, **options: Any) -> dict[str, Any]:
    """POST a task that must be accepted; its JSON."""
    response = client.post("/tasks", json={"name": name, "args": list(args), **options})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def status(client: TestClient, task_id: str) -> str:
    """The task's state as the API shows it."""
    state: str = client.get(f"/tasks/{task_id}").json()["status"]
    return state


def at(value: str) -> datetime:
    """An API time as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- delay, run_at, priority -------------------------------------------------------------------


def test_a_delay_holds_the_task_until_its_time(client: TestClient) -> None:
    task = enqueue(client, "test.echo", 1, delay=90)
    due = at(task["scheduled_at"])

    assert due - at(task["created_at"]) == timedelta(seconds=90)
    assert drain(client, now=due - timedelta(milliseconds=1)) == []
    assert status(client, task["id"]) == "queued"
    [done] = drain(client, now=due)
    assert (done.id, done.status) == (task["id"], TaskStatus.SUCCEEDED)


def test_run_at_holds_the_task_until_that_instant(client: TestClient) -> None:
    task = enqueue(client, "test.echo", 1, run_at="2031-05-01T10:00:00+02:00")
    due = at(task["scheduled_at"])

    assert task["scheduled_at"].replace("Z", "+00:00") == "2031-05-01T08:00:00+00:00"
    assert drain(client, now=due - timedelta(seconds=1)) == []
    [done] = drain(client, now=due)
    assert done.id == task["id"]


def test_run_at_in_the_past_is_due_at_once(client: TestClient) -> None:
    task = enqueue(client, "test.echo", 1, run_at="2001-01-01T00:00:00Z")

    assert [done.id for done in drain(client)] == [task["id"]]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"delay": 5, "run_at": "2031-01-01T00:00:00Z"}, "either delay or run_at"),
        ({"delay": -1}, "delay"),
        ({"run_at": "2031-01-01T00:00:00"}, "run_at"),
        ({"priority": "high"}, "priority"),
        ({"queue": ""}, "queue"),
    ],
)
def test_an_impossible_schedule_is_422(
    client: TestClient, options: dict[str, Any], named: str
) -> None:
    response = client.post("/tasks", json={"name": "test.noop", **options})

    assert response.status_code == 422
    assert named in str(response.json()["detail"])


def test_higher_priority_runs_first_then_the_oldest(make_backstop: MakeBackstop) -> None:
    backstop = make_backstop(concurrency=1)
    with TestClient(create_app(backstop.settings, run_worker=False)) as client:
        low = enqueue(client, "test.noop", priority=-5)["id"]
        first_normal = enqueue(client, "test.noop")["id"]
        urgent = enqueue(client, "test.noop", priority=10)["id"]
        second_normal = enqueue(client, "test.noop")["id"]
        later_urgent = enqueue(client, "test.noop", priority=10, delay=60)["id"]
        also_urgent = enqueue(client, "test.noop", priority=10)["id"]
        now = utcnow()

        # One task per claim, so the order they ran in is the order they were claimed in.
        ran = [task.id for task in asyncio.run(backstop.runner.drain(now=now))]

    # The delayed urgent task, not yet due, jumps no queue.
    assert ran == [urgent, also_urgent, first_normal, second_normal, low]
    assert later_urgent not in ran


# -- named queues ------------------------------------------------------------------------------


def test_queues_come_from_the_setting_and_from_the_runner(settings: Settings) -> None:
    configured = settings.model_copy(update={"queues": {"default": 2, "email": 1}})
    backstop = Backstop(configured)
    try:
        assert backstop.runner.limits == {"default": 2, "email": 1}
        assert backstop.runner.capacity == 3
        told = Runner(backstop.db, backstop.registry, configured, queues={"reports": 4})
        assert told.limits == {"reports": 4}
    finally:
        backstop.close()
    # No named queues: every queue, `concurrency` at a time.
    plain = Backstop(settings)
    try:
        assert plain.runner.limits == {None: settings.concurrency}
    finally:
        plain.close()


def test_backstop_queues_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BACKSTOP_QUEUES", "default=8, email=2,reports")

    assert Settings().queues == {"default": 8, "email": 2, "reports": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("email=x", "queue 'email': concurrency 'x' is not a whole number"),
        ("email=0", "queue 'email': concurrency must be at least 1"),
        ("=2", "queue entry '=2' has no name"),
    ],
)
def test_a_bad_queue_setting_is_refused(
    monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_queues(text)
    monkeypatch.setenv("BACKSTOP_QUEUES", text)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_parse_queues_skips_empty_entries() -> None:
    assert parse_queues("") == {}
    assert parse_queues(" a = 3 ,, b ") == {"a": 3, "b": 1}


def test_a_runner_never_claims_tasks_of_queues_it_does_not_serve(
    make_backstop: MakeBackstop,
) -> None:
    backstop = make_backstop(queues={"email": 1})
    default = backstop.tasks.add_task("test.echo", 1)
    emails = [backstop.tasks.add_task("test.echo", n, queue="email") for n in range(3)]

    ran = asyncio.run(backstop.runner.drain())

    assert sorted(task.id for task in ran) == sorted(emails)
    with backstop.db.read() as conn:
        assert store_tasks.get_task(conn, default).status is TaskStatus.QUEUED
    # A runner serving every queue takes it.
    everything = make_backstop(queues={})
    assert [task.id for task in asyncio.run(everything.runner.drain())] == [default]


def test_the_queue_a_post_names_is_the_queue_that_serves_it(
    make_backstop: MakeBackstop,
) -> None:
    backstop = make_backstop(queues={"reports": 1})
    with TestClient(create_app(backstop.settings, run_worker=False)) as client:
        report = enqueue(client, "test.echo", 1, queue="reports")
        other = enqueue(client, "test.echo", 2)
        assert (report["queue"], other["queue"]) == ("reports", "default")

        ran = asyncio.run(backstop.runner.drain())

        assert [task.id for task in ran] == [report["id"]]
        assert status(client, other["id"]) == "queued"


def test_a_flood_in_one_queue_does_not_delay_another_queue(settings: Settings) -> None:
    flooded = settings.model_copy(
        update={"queues": {"default": 2, "slow": 1}, "shutdown_grace": 0.2}
    )
    with TestClient(create_app(flooded, run_worker=True)) as client:
        slow = [enqueue(client, "test.sleep", 30, queue="slow")["id"] for _ in range(20)]
        fast = enqueue(client, "test.echo", 5)

        wait_until(
            lambda: status(client, fast["id"]) == "succeeded",
            timeout=10,
            what="the default queue's task to succeed",
        )

        stats = client.get("/tasks/stats").json()["queues"]["slow"]
        states = [status(client, task_id) for task_id in slow]
    # The slow queue runs its one task at a time and is still backed up.
    assert stats["running"] <= 1
    assert stats["queued"] >= 19
    assert states.count("queued") >= 19
    assert "succeeded" not in states


# -- `backstop worker --queues` ----------------------------------------------------------------


def _environment(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.update(BACKSTOP_DATA_DIR=str(data_dir), BACKSTOP_POLL_INTERVAL="0.05")
    return env


@pytest.mark.parametrize(
    ("queues", "message"),
    [
        # Each way `parse_queues` refuses an entry is covered above; here the command's answer.
        ("email=x", "queue 'email': concurrency 'x' is not a whole number"),
        (",", "name at least one queue"),
    ],
)
def test_worker_refuses_bad_queues_with_one_line(tmp_path: Path, queues: str, message: str) -> None:
    data_dir = tmp_path / "data"

    done = subprocess.run(
        [BACKSTOP, "worker", "--queues", queues],
        env=_environment(data_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode != 0
    assert done.stderr.splitlines() == [f"backstop: Invalid value for --queues: {message}"]
    assert not data_dir.exists()


def test_worker_serves_only_the_queues_it_is_given(make_backstop: MakeBackstop) -> None:
    enqueuer = make_backstop()
    data_dir = enqueuer.settings.data_dir
    ignored = enqueuer.tasks.add_task("log.append", "default", file="queues.log")
    first = enqueuer.tasks.add_task("log.append", "email 1", file="queues.log", queue="email")
    log = data_dir.parent / "worker.out"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [BACKSTOP, "worker", "--queues", "email=1"],
            env=_environment(data_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def succeeded(task_id: str) -> bool:
            assert worker.poll() is None, log.read_text()
            with enqueuer.db.read() as conn:
                return store_tasks.get_task(conn, task_id).status is TaskStatus.SUCCEEDED

        wait_until(lambda: succeeded(first), what="the worker to run the email task")
        # Claims after the first one still pass the default task by.
        second = enqueuer.tasks.add_task("log.append", "email 2", file="queues.log", queue="email")
        wait_until(lambda: succeeded(second), what="the worker to run the next email task")

        with enqueuer.db.read() as conn:
            assert store_tasks.get_task(conn, ignored).status is TaskStatus.QUEUED
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    lines = (data_dir / "logs" / "queues.log").read_text(encoding="utf-8").splitlines()
    assert lines == ["email 1", "email 2"]
    assert "(queues email=1)" in log.read_text()
