"""Waiting on a task that another process runs: `TaskClient.wait`, `?wait=` and the event
stream, against a real `backstop serve` subprocess.

The server runs the tasks (or, for `?wait=`, only answers while this process finishes the
task); this process waits. Nothing here waits on a timer: each test waits for the answer or
the next event, with a deadline far beyond what it should take.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.backstop import Backstop
from app.errors import TaskFailed, WaitTimeout
from app.settings import Settings
from store import leases, outcomes
from store.models import TaskStatus
from tests.e2e.test_restarts import Servers

pytestmark = pytest.mark.e2e

DEADLINE = 30.0


@pytest.fixture
def here(settings: Settings, tmp_path: Path) -> Iterator[Backstop]:
    """A Backstop in this process on the server's data folder; its runner never starts."""
    instance = Backstop(settings.model_copy(update={"data_dir": tmp_path / "data"}))
    yield instance
    instance.close()


def test_wait_returns_the_result_of_a_task_another_process_runs(
    servers: Servers, here: Backstop, tmp_path: Path
) -> None:
    servers.start(tmp_path / "data")
    task_id = here.tasks.add_task("test.echo", 7)
    assert here.tasks.wait(task_id, timeout=DEADLINE) == {"value": 7, "attempt": 1}


def test_wait_raises_the_error_of_a_task_another_process_runs(
    servers: Servers, here: Backstop, tmp_path: Path
) -> None:
    servers.start(tmp_path / "data")
    task_id = here.tasks.add_task("test.fatal")
    with pytest.raises(TaskFailed) as raised:
        here.tasks.wait(task_id, timeout=DEADLINE)
    assert raised.value.task_id == task_id
    assert raised.value.status == TaskStatus.FAILED
    assert raised.value.last_error == "Fatal: not worth retrying"

    async def waited() -> Any:
        return await here.tasks.wait_async(task_id, timeout=DEADLINE)

    with pytest.raises(TaskFailed, match="Fatal: not worth retrying"):
        asyncio.run(waited())


def test_wait_times_out_with_the_task_as_it_was(here: Backstop) -> None:
    here.prepare()
    task_id = here.tasks.add_task("test.echo", 1)  # no runner anywhere
    with pytest.raises(WaitTimeout) as raised:
        here.tasks.wait(task_id, timeout=0.05)
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.status == TaskStatus.QUEUED


def _events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event in a Server-Sent Events stream."""
    name, data = "message", ""
    for line in lines:
        if line == "":
            if data:
                yield name, json.loads(data)
            name, data = "message", ""
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data += line.removeprefix("data: ")


def test_the_event_stream_follows_a_task_that_retries_once(
    servers: Servers, tmp_path: Path
) -> None:
    server = servers.start(tmp_path / "data")
    gates = tmp_path / "gates"
    gates.mkdir()
    task_id = server.enqueue("test.gated_retry", str(gates))
    seen: list[tuple[str, str, int, Any]] = []
    with server.http.stream("GET", f"/tasks/{task_id}/events", timeout=DEADLINE) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for name, task in _events(response.iter_lines()):
            seen.append((name, task["status"], task["attempts"], task["progress"]))
            if task["status"] == "running" and task["progress"] is not None:
                (gates / str(task["attempts"])).touch()  # seen running: let it go on
    states = [(status, attempts) for name, status, attempts, _ in seen if name == "state"]
    # The first event is whatever the task was at the connection; then each change.
    assert states[-4:] == [("running", 1), ("retrying", 1), ("running", 2), ("succeeded", 2)]
    assert states[0] in [("queued", 0), ("running", 1)]
    progress = {"done": 1, "total": 2, "message": "attempt 2 at its gate"}
    assert (TaskStatus.SUCCEEDED, progress) == (seen[-1][1], seen[-1][3])
    # The stream ended by itself after the terminal state.


def test_an_unknown_task_has_no_event_stream(servers: Servers, tmp_path: Path) -> None:
    server = servers.start(tmp_path / "data")
    response = server.http.get("/tasks/no-such-task/events")
    assert response.status_code == 404
    assert "no-such-task" in response.json()["detail"]


def test_wait_query_answers_when_another_process_finishes_the_task(
    servers: Servers, here: Backstop, tmp_path: Path
) -> None:
    server = servers.start(tmp_path / "data", run_worker="false")
    task_id = here.tasks.add_task("test.echo", 5)
    answered = threading.Event()
    answer: list[httpx.Response] = []

    def long_poll() -> None:
        answer.append(server.http.get(f"/tasks/{task_id}", params={"wait": 60}, timeout=90))
        answered.set()

    poller = threading.Thread(target=long_poll)
    poller.start()
    try:
        # This process finishes the task, as another runner would.
        with here.db.write() as conn:
            [claim] = leases.claim_due(conn, "elsewhere", 1, lease_seconds=30)
        assert not answered.is_set()
        with here.db.write() as conn:
            outcomes.mark_succeeded(conn, claim.lease, {"from": "elsewhere"})
        # Within the deadline, far below the 60 s the request may wait: woken, not timed out.
        assert answered.wait(DEADLINE), "?wait= did not answer when the task finished"
    finally:
        poller.join(90)
    assert answer[0].status_code == 200
    assert answer[0].json()["status"] == "succeeded"
    assert answer[0].json()["result"] == {"from": "elsewhere"}
