"""The real server, killed and restarted: nothing accepted is lost, nothing finished runs twice.

Each test starts `backstop serve` as a subprocess on its own data folder, with a short lease so
that a killed server's leases lapse within seconds, and talks to it over HTTP. After a kill the
SQLite file is read directly through `store/`, as the next process would find it.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from store import attempts as store_attempts
from store import tasks as store_tasks
from store.engine import Database
from store.models import Attempt, AttemptOutcome, Task, TaskStatus
from tests.support.projects import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKSTOP = Path(sys.executable).parent / "backstop"
START_TIMEOUT = 20.0
# Log lines that only say an interval job ran: dozens a second, never the clue.
NOISE = ("apscheduler.executors",)


class Server:
    """One `backstop serve` process; its stdout and stderr go to `log_path`; `open_files`
    caps its file descriptors (`ulimit -n`), and `extra_env` adds to its environment last."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        settings: dict[str, str],
        open_files: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
        env.update(
            BACKSTOP_DATA_DIR=str(data_dir),
            BACKSTOP_TASK_MODULES="tests.support.tasks",
            BACKSTOP_POLL_INTERVAL="0.05",
            BACKSTOP_LEASE_SECONDS="2",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        env.update({f"BACKSTOP_{key.upper()}": value for key, value in settings.items()})
        env.update(extra_env or {})
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BACKSTOP), "serve", "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=None if open_files is None else _limit_files(open_files),
            )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def wait_ready(self) -> None:
        """Poll `/readyz` until it answers 200; fail at once if the process dies first."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode} before it was ready")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {START_TIMEOUT}s")
            time.sleep(0.05)

    def enqueue(self, name: str, *args: Any, **kwargs: Any) -> str:
        """POST a task; returns its id, which the server accepted (202)."""
        response = self.http.post("/tasks", json={"name": name, "args": args, "kwargs": kwargs})
        assert response.status_code == 202, response.text
        task_id: str = response.json()["id"]
        return task_id

    def task(self, task_id: str) -> dict[str, Any]:
        """The task as the API shows it."""
        response = self.http.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def attempts(self, task_id: str) -> list[dict[str, Any]]:
        """The task's attempts as the API shows them."""
        response = self.http.get(f"/tasks/{task_id}/attempts")
        assert response.status_code == 200, response.text
        body: list[dict[str, Any]] = response.json()
        return body

    def ids_with_status(self, status: TaskStatus) -> set[str]:
        """The ids of every task in `status` (the tests stay under one page of 500)."""
        response = self.http.get("/tasks", params={"status": status.value, "limit": 500})
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    def kill(self) -> None:
        """SIGKILL: no lifespan shutdown, no release, leases left to lapse."""
        self.process.kill()
        self.process.wait(timeout=10)

    def terminate(self, timeout: float) -> int:
        """SIGTERM, then wait for the process to exit; returns its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        """Kill the process if it still runs, and close the HTTP client."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.http.close()

    def log_tail(self, lines: int = 150) -> str:
        """The end of the server's log, without the interval jobs' chatter."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        kept = [line for line in text.splitlines() if not any(noise in line for noise in NOISE)]
        return "\n".join(kept[-lines:])


def _limit_files(count: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return limit


class Servers:
    """Starts servers for one test and tears every one of them down."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Server] = []

    def start(
        self,
        data_dir: Path,
        open_files: int | None = None,
        extra_env: dict[str, str] | None = None,
        **settings: str,
    ) -> Server:
        """Start `backstop serve` on `data_dir` (settings as `BACKSTOP_*` names, lower case),
        with at most `open_files` file descriptors and `extra_env` in its environment."""
        log_path = self.tmp_path / f"server-{len(self.started) + 1}.log"
        server = Server(data_dir, log_path, settings, open_files, extra_env)
        self.started.append(server)
        server.wait_ready()
        return server

    def close(self) -> None:
        for server in self.started:
            server.close()


def read_tasks(data_dir: Path, task_ids: list[str]) -> dict[str, Task]:
    """The rows of these tasks, read straight from the SQLite file."""
    db = Database.from_url(f"sqlite:///{data_dir}/backstop.db")
    try:
        with db.read() as conn:
            return {task.id: task for task in store_tasks.get_tasks(conn, task_ids)}
    finally:
        db.dispose()


def read_attempts(data_dir: Path, task_id: str) -> list[Attempt]:
    """The attempt rows of a task, read straight from the SQLite file."""
    db = Database.from_url(f"sqlite:///{data_dir}/backstop.db")
    try:
        with db.read() as conn:
            return store_attempts.list_attempts(conn, task_id)
    finally:
        db.dispose()


def run_lines(data_dir: Path, task_id: str) -> list[str]:
    """What `test.sleep` recorded for a task: 'start N' / 'done N' lines."""
    path = data_dir / "runs" / f"{task_id}.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def started(data_dir: Path) -> set[str]:
    """The ids of tasks whose function has started at least once."""
    folder = data_dir / "runs"
    return {path.stem for path in folder.glob("*.txt")} if folder.exists() else set()


def test_sigkill_mid_run_loses_nothing_and_retries_after_the_lease_expires(
    servers: Servers, data_dir: Path
) -> None:
    first = servers.start(data_dir, concurrency="4")
    accepted = [first.enqueue("test.sleep", 0.5) for _ in range(20)]
    wait_until(
        lambda: bool(started(data_dir)) and bool(first.ids_with_status(TaskStatus.QUEUED)),
        timeout=10,
        what="a task running while others still wait",
    )
    first.kill()

    at_kill = read_tasks(data_dir, accepted)
    assert set(at_kill) == set(accepted)
    killed = {task_id for task_id, task in at_kill.items() if task.status == TaskStatus.RUNNING}
    waiting = {task_id for task_id, task in at_kill.items() if task.status == TaskStatus.QUEUED}
    assert killed, "the kill should catch at least one task mid-run"
    assert waiting, "the kill should leave tasks that never started"

    second = servers.start(data_dir, concurrency="4")
    wait_until(
        lambda: second.ids_with_status(TaskStatus.SUCCEEDED) >= set(accepted),
        timeout=30,
        what="every accepted task to succeed after the restart",
    )

    final = read_tasks(data_dir, accepted)
    for task_id in killed:
        assert final[task_id].attempts >= 2
        history = read_attempts(data_dir, task_id)
        assert history[0].outcome == AttemptOutcome.LEASE_EXPIRED
        assert history[0].error == "lease expired"
        assert history[-1].outcome == AttemptOutcome.SUCCEEDED
        assert history[-1].worker != history[0].worker
    for task_id in waiting:
        # Never claimed before the kill: the restarted server ran it once.
        assert final[task_id].attempts == 1
        assert run_lines(data_dir, task_id) == ["start 1", "done 1"]


def test_sigterm_lets_running_tasks_finish_and_nothing_runs_twice(
    servers: Servers, data_dir: Path
) -> None:
    first = servers.start(data_dir, concurrency="4", shutdown_grace="10")
    accepted = [first.enqueue("test.sleep", 0.5) for _ in range(12)]
    wait_until(
        lambda: bool(started(data_dir)) and bool(first.ids_with_status(TaskStatus.QUEUED)),
        timeout=10,
        what="a task running while others still wait",
    )

    assert first.terminate(timeout=20) == 0

    at_stop = read_tasks(data_dir, accepted)
    assert not [t.id for t in at_stop.values() if t.status == TaskStatus.RUNNING]
    assert any(t.status == TaskStatus.SUCCEEDED for t in at_stop.values())
    assert any(t.status == TaskStatus.QUEUED for t in at_stop.values())

    second = servers.start(data_dir, concurrency="4", shutdown_grace="10")
    wait_until(
        lambda: second.ids_with_status(TaskStatus.SUCCEEDED) >= set(accepted),
        timeout=20,
        what="every accepted task to succeed after the restart",
    )

    final = read_tasks(data_dir, accepted)
    for task_id in accepted:
        assert run_lines(data_dir, task_id) == ["start 1", "done 1"], task_id
        assert final[task_id].attempts == 1
        assert [a.outcome for a in read_attempts(data_dir, task_id)] == [AttemptOutcome.SUCCEEDED]


def test_sigterm_past_the_grace_releases_running_tasks_and_they_run_again(
    servers: Servers, data_dir: Path
) -> None:
    first = servers.start(data_dir, concurrency="4", shutdown_grace="0.2")
    accepted = [first.enqueue("test.sleep", 30) for _ in range(2)]
    wait_until(
        lambda: (
            first.ids_with_status(TaskStatus.RUNNING) == set(accepted)
            and started(data_dir) == set(accepted)
        ),
        timeout=10,
        what="both long tasks to be running",
    )

    stopping = time.monotonic()
    assert first.terminate(timeout=15) == 0
    assert time.monotonic() - stopping < 8, "a 0.2 s grace should not hold the stop"

    released = read_tasks(data_dir, accepted)
    for task_id in accepted:
        task = released[task_id]
        assert task.status == TaskStatus.QUEUED
        assert task.attempts == 0
        assert task.lease_owner is None
        history = read_attempts(data_dir, task_id)
        assert [(a.number, a.outcome) for a in history] == [(1, AttemptOutcome.RELEASED)]
        assert history[0].finished_at is not None

    second = servers.start(data_dir, concurrency="4", shutdown_grace="0.2")
    wait_until(
        lambda: all(run_lines(data_dir, i).count("start 1") == 2 for i in accepted),
        timeout=10,
        what="the released tasks to start again",
    )
    for task_id in accepted:
        shown = second.task(task_id)
        assert shown["status"] == TaskStatus.RUNNING
        assert shown["attempts"] == 1
        assert [a["outcome"] for a in second.attempts(task_id)] == [
            AttemptOutcome.RELEASED,
            None,
        ]


def test_a_retry_scheduled_before_a_sigkill_still_happens_on_time(
    servers: Servers, data_dir: Path
) -> None:
    first = servers.start(data_dir)
    task_id = first.enqueue("test.flaky", failures=1)
    wait_until(
        lambda: first.task(task_id)["status"] == TaskStatus.RETRYING,
        timeout=10,
        what="the first attempt to fail and schedule a retry",
    )
    before_kill = first.task(task_id)
    assert before_kill["attempts"] == 1
    retry_at = datetime.fromisoformat(before_kill["scheduled_at"])
    first.kill()

    second = servers.start(data_dir)
    wait_until(
        lambda: second.task(task_id)["status"] == TaskStatus.SUCCEEDED,
        timeout=15,
        what="the retry to run after the restart",
    )
    done = second.task(task_id)
    assert done["attempts"] == 2
    assert done["result"] == 2
    history = second.attempts(task_id)
    assert [a["outcome"] for a in history] == [AttemptOutcome.FAILED, AttemptOutcome.SUCCEEDED]
    assert datetime.fromisoformat(history[1]["started_at"]) >= retry_at
    # The scheduled retry lay 2 s ahead of a kill that came at once: the new process ran it.
    assert history[1]["worker"] != history[0]["worker"]
    attempts_file = data_dir / "attempts" / f"{task_id}.txt"
    assert attempts_file.read_text(encoding="utf-8").splitlines() == ["1", "2"]


def test_every_accepted_task_is_committed_when_the_server_is_killed(
    servers: Servers, data_dir: Path
) -> None:
    server = servers.start(data_dir, run_worker="false")
    accepted: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    target = 150

    def post_until_the_server_dies(worker: int) -> None:
        with httpx.Client(base_url=str(server.http.base_url), timeout=10) as http:
            for n in range(10_000):
                body = {"name": "test.echo", "args": [worker * 10_000 + n]}
                try:
                    response = http.post("/tasks", json=body)
                except httpx.TransportError:
                    return  # killed: this request was never answered, so never accepted
                assert response.status_code == 202, response.text
                with lock:
                    accepted.append(response.json()["id"])
                    if len(accepted) >= target:
                        enough.set()

    with ThreadPoolExecutor(max_workers=6) as pool:
        posters = [pool.submit(post_until_the_server_dies, worker) for worker in range(6)]
        assert enough.wait(timeout=30), "the server accepted too few tasks"
        # Killed while requests are still in flight: the last 202s come right before it.
        server.kill()
        for poster in posters:
            poster.result(timeout=15)

    assert len(accepted) >= target
    stored = read_tasks(data_dir, accepted)
    missing = set(accepted) - set(stored)
    assert not missing, f"{len(missing)} accepted tasks are not in the database"
    assert {task.status for task in stored.values()} == {TaskStatus.QUEUED}
