"""`POST /tasks/{id}/cancel` and `POST /tasks/{id}/retry`, answer by answer, and the cancel of
running sync and async functions by the app's own runner and by another process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.backstop import Backstop
from app.main import create_app
from app.settings import Settings
from store import control, leases, outcomes
from store import tasks as store_tasks
from store.engine import Database
from store.models import TaskStatus
from store.outcomes import Outcome
from store.timeutil import utcnow
from tests.support.client import count_tasks, drain, service
from tests.support.tasks import SWALLOW_STARTED
from tests.support.waiting import wait_until

# Long enough that a test passing on a deadline far shorter proves the function was stopped.
LONG = 20.0
PROMPT = 5.0


@pytest.fixture
def running_client(settings: Settings) -> Iterator[TestClient]:
    """The API with its runner started in the app's lifespan, as `serve` runs it."""
    with TestClient(create_app(settings, run_worker=True)) as test_client:
        yield test_client


# -- helpers -----------------------------------------------------------------------------------


def enqueue(client: TestClient, name: str, *args: Any, **options: Any) -> dict[str, Any]:
    """POST a task that must be accepted; its JSON."""
    response = client.post("/tasks", json={"name": name, "args": list(args), **options})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def show(client: TestClient, task_id: str) -> dict[str, Any]:
    """The task as `GET /tasks/{id}` shows it."""
    response = client.get(f"/tasks/{task_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def attempts(client: TestClient, task_id: str) -> list[dict[str, Any]]:
    """The task's attempts as `GET /tasks/{id}/attempts` shows them."""
    response = client.get(f"/tasks/{task_id}/attempts")
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


def act(client: TestClient, task_id: str, action: str, code: int = 200) -> dict[str, Any]:
    """POST `/tasks/{id}/{action}` and check the status code; the JSON answer."""
    response = client.post(f"/tasks/{task_id}/{action}")
    assert response.status_code == code, response.text
    body: dict[str, Any] = response.json()
    return body


def marks(settings: Settings, task_id: str) -> list[str]:
    """What `test.sleep` / `test.async_sleep` recorded: 'start N' and 'done N' lines."""
    path = Path(settings.data_dir) / "runs" / f"{task_id}.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def claim_all(client: TestClient) -> None:
    """Claim every due task as a runner in another process would, leaving them running."""
    with service(client).db.write() as conn:
        leases.claim_due(conn, "elsewhere", 100, lease_seconds=60)


def fail(client: TestClient) -> dict[str, Any]:
    """A task that failed for good."""
    task = enqueue(client, "test.fatal")
    drain(client)
    return show(client, task["id"])


def succeed(client: TestClient) -> dict[str, Any]:
    """A task that succeeded."""
    task = enqueue(client, "test.echo", 1)
    drain(client)
    return show(client, task["id"])


def cancel_queued(client: TestClient) -> dict[str, Any]:
    """A task cancelled before it ran."""
    task = enqueue(client, "test.echo", 1)
    return act(client, task["id"], "cancel")


def retrying(client: TestClient) -> dict[str, Any]:
    """A task whose first attempt failed and that waits for its retry."""
    task = enqueue(client, "test.flaky", 1)
    drain(client)
    shown = show(client, task["id"])
    assert shown["status"] == "retrying"
    return shown


def running(client: TestClient) -> dict[str, Any]:
    """A task held by a runner elsewhere."""
    task = enqueue(client, "test.echo", 1)
    claim_all(client)
    return show(client, task["id"])


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_of_a_queued_task_ends_it_at_once_and_it_never_runs(
    client: TestClient, settings: Settings
) -> None:
    task = enqueue(client, "test.sleep", 0)

    cancelled = act(client, task["id"], "cancel")

    assert cancelled["id"] == task["id"]
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    assert cancelled["attempts"] == 0
    assert show(client, task["id"]) == cancelled
    assert drain(client, now=utcnow() + timedelta(days=1)) == []
    assert show(client, task["id"]) == cancelled
    assert attempts(client, task["id"]) == []
    assert marks(settings, task["id"]) == []


def test_cancel_of_a_delayed_task_ends_it_before_its_time(client: TestClient) -> None:
    task = enqueue(client, "test.echo", 1, delay=60)

    assert act(client, task["id"], "cancel")["status"] == "cancelled"
    assert drain(client, now=utcnow() + timedelta(seconds=120)) == []


def test_cancel_of_a_retrying_task_ends_it_and_the_retry_never_comes(
    client: TestClient,
) -> None:
    task = retrying(client)

    cancelled = act(client, task["id"], "cancel")

    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    assert cancelled["attempts"] == 1
    assert cancelled["last_error"] == "Flaky: attempt 1 of 1 planned failures"
    assert drain(client, now=utcnow() + timedelta(hours=1)) == []
    assert [a["outcome"] for a in attempts(client, task["id"])] == ["failed"]


def test_cancel_of_a_task_running_elsewhere_answers_with_it_still_running(
    client: TestClient,
) -> None:
    task = running(client)

    asked = act(client, task["id"], "cancel")

    # The runner holding it ends it once it sees the request (tests below).
    assert asked["status"] == "running"
    assert asked["finished_at"] is None


@pytest.mark.parametrize(
    ("make", "status"),
    [(succeed, "succeeded"), (fail, "failed"), (cancel_queued, "cancelled")],
)
def test_cancel_of_a_finished_task_is_409_and_changes_nothing(
    client: TestClient, make: Any, status: str
) -> None:
    task = make(client)
    assert task["status"] == status

    detail = act(client, task["id"], "cancel", 409)["detail"]

    assert detail == (
        f"task '{task['id']}' is {status}: only queued, retrying or running tasks can be cancelled"
    )
    assert show(client, task["id"]) == task


def test_cancel_of_an_unknown_task_is_404(client: TestClient) -> None:
    assert act(client, "no-such-task", "cancel", 404) == {"detail": "task 'no-such-task' not found"}


# -- cancel of running functions -------------------------------------------------------------


def _wait_running(client: TestClient, settings: Settings, task_id: str) -> None:
    wait_until(
        lambda: (
            show(client, task_id)["status"] == "running"
            and marks(settings, task_id)[:1] == ["start 1"]
        ),
        timeout=10,
        what="the function to start",
    )


def _wait_cancelled(client: TestClient, task_id: str) -> float:
    """Seconds until the task ended, which must be `cancelled` within `PROMPT`."""
    started = time.monotonic()
    wait_until(
        lambda: show(client, task_id)["status"] != "running",
        timeout=PROMPT,
        what="the task to stop",
    )
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        # The sync function sees `ctx.cancelled`, returns, and its result is discarded.
        ("test.sleep", ["start 1", "done 1"]),
        # The async function is cancelled where it awaits: it never reaches its end.
        ("test.async_sleep", ["start 1"]),
    ],
)
def test_cancel_of_a_running_function_stops_it_and_ends_the_task_cancelled(
    running_client: TestClient, settings: Settings, name: str, lines: list[str]
) -> None:
    task = enqueue(running_client, name, LONG)
    _wait_running(running_client, settings, task["id"])

    asked = act(running_client, task["id"], "cancel")
    elapsed = _wait_cancelled(running_client, task["id"])

    assert asked["status"] == "running"
    assert elapsed < PROMPT < LONG
    ended = show(running_client, task["id"])
    assert ended["status"] == "cancelled"
    assert ended["result"] is None
    assert ended["finished_at"] is not None
    assert ended["attempts"] == 1
    assert [a["outcome"] for a in attempts(running_client, task["id"])] == ["cancelled"]
    assert marks(settings, task["id"]) == lines
    # Nothing brings it back: the runner goes on with other work.
    after = enqueue(running_client, "test.echo", 3)
    done = running_client.get(f"/tasks/{after['id']}", params={"wait": 10}).json()
    assert done["status"] == "succeeded"
    assert show(running_client, task["id"])["status"] == "cancelled"


@pytest.mark.parametrize("name", ["test.sleep", "test.async_sleep"])
def test_a_cancel_written_by_another_process_stops_the_running_function(
    running_client: TestClient, settings: Settings, name: str
) -> None:
    task = enqueue(running_client, name, LONG)
    _wait_running(running_client, settings, task["id"])

    # As `backstop tasks cancel` or another server would: straight to the database, with no
    # call into this process's runner, which has to notice the request on its own.
    other = Database.from_url(settings.url)
    try:
        with other.write() as conn:
            asked = control.cancel_task(conn, task["id"])
    finally:
        other.dispose()
    elapsed = _wait_cancelled(running_client, task["id"])

    assert asked.status is TaskStatus.RUNNING
    assert elapsed < PROMPT < LONG
    ended = show(running_client, task["id"])
    assert (ended["status"], ended["result"]) == ("cancelled", None)
    assert [a["outcome"] for a in attempts(running_client, task["id"])] == ["cancelled"]


def test_an_async_function_asked_to_stop_before_it_starts_never_runs_on(
    backstop: Backstop,
) -> None:
    """The request can land between the claim and the first step of the function."""
    task = backstop.tasks.enqueue("test.async_sleep", [LONG])
    with backstop.db.write() as conn:
        (claimed,) = leases.claim_due(conn, "w", 1, lease_seconds=30)
        control.cancel_task(conn, task.id)
    executor = backstop.runner.executor
    ctx = executor.context(claimed)
    ctx.stop.request()

    async def run() -> float:
        started = time.monotonic()
        outcome = await executor.call_async(claimed, ctx)
        with backstop.db.write() as conn:
            outcomes.record(conn, [outcome])
        return time.monotonic() - started

    elapsed = asyncio.run(run())

    assert elapsed < PROMPT
    with backstop.db.read() as conn:
        assert store_tasks.get_task(conn, task.id).status is TaskStatus.CANCELLED


# -- retry -------------------------------------------------------------------------------------


def test_retry_of_a_failed_task_queues_it_with_a_fresh_budget_and_keeps_its_history(
    client: TestClient,
) -> None:
    task = enqueue(client, "test.flaky", 10, max_attempts=2)
    drain(client)
    drain(client, now=utcnow() + timedelta(seconds=3))
    failed = show(client, task["id"])
    assert (failed["status"], failed["attempts"]) == ("failed", 2)
    history = attempts(client, task["id"])
    assert [a["outcome"] for a in history] == ["failed", "failed"]

    again = act(client, task["id"], "retry")

    assert again["id"] == task["id"]
    assert again["status"] == "queued"
    assert (again["attempts"], again["max_attempts"]) == (0, 2)
    assert (again["finished_at"], again["result"]) == (None, None)
    assert again["created_at"] == task["created_at"]
    assert show(client, task["id"]) == again
    assert attempts(client, task["id"]) == history

    # It runs again, with its whole budget: one more retry before it fails again.
    [first] = drain(client)
    assert (first.status, first.attempts) == (TaskStatus.RETRYING, 1)
    [second] = drain(client, now=utcnow() + timedelta(seconds=3))
    assert (second.status, second.attempts) == (TaskStatus.FAILED, 2)
    assert [a["outcome"] for a in attempts(client, task["id"])] == ["failed"] * 4
    assert attempts(client, task["id"])[:2] == history


def test_retry_of_a_cancelled_task_runs_it_to_success(client: TestClient) -> None:
    task = cancel_queued(client)

    again = act(client, task["id"], "retry")

    assert (again["status"], again["attempts"], again["finished_at"]) == ("queued", 0, None)
    [done] = drain(client)
    assert (done.id, done.status, done.result) == (
        task["id"],
        TaskStatus.SUCCEEDED,
        {"value": 1, "attempt": 1},
    )


def test_retry_of_a_task_cancelled_while_running_runs_it_again_to_the_end(
    running_client: TestClient, settings: Settings
) -> None:
    task = enqueue(running_client, "test.sleep", LONG)
    _wait_running(running_client, settings, task["id"])
    act(running_client, task["id"], "cancel")
    _wait_cancelled(running_client, task["id"])
    assert show(running_client, task["id"])["status"] == "cancelled"

    again = act(running_client, task["id"], "retry")

    assert again["status"] in ("queued", "running")
    wait_until(
        lambda: marks(settings, task["id"]).count("start 1") == 2,
        timeout=10,
        what="the retried task to start again",
    )
    # The old request does not carry over: this run is not cancelled, it is still going.
    shown = show(running_client, task["id"])
    assert (shown["status"], shown["attempts"]) == ("running", 1)
    assert [a["outcome"] for a in attempts(running_client, task["id"])] == ["cancelled", None]
    act(running_client, task["id"], "cancel")
    _wait_cancelled(running_client, task["id"])


@pytest.mark.parametrize(
    ("make", "status"),
    [(enqueue, "queued"), (running, "running"), (retrying, "retrying"), (succeed, "succeeded")],
)
def test_retry_of_a_task_that_is_not_failed_or_cancelled_is_409_and_changes_nothing(
    client: TestClient, make: Any, status: str
) -> None:
    task = make(client, "test.echo", 1) if make is enqueue else make(client)
    before = show(client, task["id"])
    assert before["status"] == status

    detail = act(client, task["id"], "retry", 409)["detail"]

    assert detail == (
        f"task '{task['id']}' is {status}: only failed or cancelled tasks can be retried"
    )
    assert show(client, task["id"]) == before


def test_retry_of_an_unknown_task_is_404(client: TestClient) -> None:
    assert act(client, "no-such-task", "retry", 404) == {"detail": "task 'no-such-task' not found"}
    assert count_tasks(client) == 0


def test_an_async_function_that_swallows_its_cancel_leaves_its_runner_task_uncancelled(
    backstop: Backstop,
) -> None:
    """The stop request's cancellation is taken back when the function returns anyway, so
    the runner's task is not left half-cancelled for whatever it awaits next."""
    backstop.tasks.enqueue("test.async_swallow")
    with backstop.db.write() as conn:
        (claimed,) = leases.claim_due(conn, "w", 1, lease_seconds=30)
    executor = backstop.runner.executor

    async def run() -> tuple[Outcome, int]:
        started = asyncio.Event()
        SWALLOW_STARTED[:] = [started]
        ctx = executor.context(claimed)

        async def attempt() -> tuple[Outcome, int]:
            outcome = await executor.call_async(claimed, ctx)
            current = asyncio.current_task()
            assert current is not None
            return outcome, current.cancelling()

        job = asyncio.ensure_future(attempt())
        await asyncio.wait_for(started.wait(), PROMPT)
        ctx.stop.request()
        return await job

    outcome, cancelling = asyncio.run(run())

    assert (outcome.error, outcome.result, cancelling) == (None, "swallowed", 0)
