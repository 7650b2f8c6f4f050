"""A poison task, one that kills the process running it, ends `failed` after its lease lapsed
`BACKSTOP_MAX_LEASE_EXPIRIES` times, instead of killing runners forever; other work goes on.

A supervisor loop in the test plays systemd: whenever the `backstop worker` subprocess dies, it
starts a new one on the same SQLite file. The lease is short, so a dead worker's lease lapses
within a second and the next worker reclaims it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.backstop import Backstop
from app.settings import Settings
from store import attempts as store_attempts
from store import tasks as store_tasks
from store.models import AttemptOutcome, Task, TaskStatus
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKSTOP = Path(sys.executable).parent / "backstop"
MAX_EXPIRIES = 2


class Supervisor:
    """Keeps one `backstop worker` running: `tend()` starts a new one when the last one died."""

    def __init__(self, data_dir: Path, logs: Path) -> None:
        self.logs = logs
        self.exit_codes: list[int] = []
        self.process: subprocess.Popen[bytes] | None = None
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
        env.update(
            BACKSTOP_DATA_DIR=str(data_dir),
            BACKSTOP_TASK_MODULES="tests.support.tasks",
            BACKSTOP_POLL_INTERVAL="0.05",
            BACKSTOP_LEASE_SECONDS="1",
            BACKSTOP_MAX_LEASE_EXPIRIES=str(MAX_EXPIRIES),
            # One task at a time. Tasks running beside a crashing one die with it, and their
            # leases lapse too: the runner cannot tell which task killed it, so they count the
            # same. One slot keeps this test's bystanders out of the line of fire.
            BACKSTOP_CONCURRENCY="1",
            BACKSTOP_SHUTDOWN_GRACE="5",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        self.env = env

    def tend(self) -> None:
        """Start a worker if none runs (the first, or after the last one died)."""
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                return
            self.exit_codes.append(code)
        log = self.logs / f"worker-{len(self.exit_codes) + 1}.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(BACKSTOP), "worker"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> int:
        """SIGTERM the running worker; its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=20)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    """The supervisor of the test's workers; prints their logs (shown when the test fails)."""
    running = Supervisor(tmp_path / "data", tmp_path)
    try:
        yield running
    finally:
        running.close()
        for log in sorted(tmp_path.glob("worker-*.log")):
            print(f"----- {log.name} -----")
            print(log.read_text(encoding="utf-8", errors="replace")[-6000:])


@pytest.fixture
def enqueuer(tmp_path: Path) -> Iterator[Backstop]:
    """The test's own handle on the workers' database: it enqueues and reads tasks."""
    backstop = Backstop(
        Settings(data_dir=tmp_path / "data", database_url="", task_modules=["tests.support.tasks"])
    )
    backstop.prepare()
    yield backstop
    backstop.close()


def _tasks(enqueuer: Backstop, task_ids: list[str]) -> dict[str, Task]:
    with enqueuer.db.read() as conn:
        return {task.id: task for task in store_tasks.get_tasks(conn, task_ids)}


def test_a_task_that_crashes_its_runner_fails_after_n_reclaims_while_other_work_goes_on(
    supervisor: Supervisor, enqueuer: Backstop
) -> None:
    add = enqueuer.tasks.add_task
    normal = [add("test.echo", n) for n in range(3)]
    poison = add("test.crash")
    normal += [add("test.echo", n) for n in range(3, 6)]
    late: list[str] = []

    def poison_failed_and_the_rest_ran() -> bool:
        supervisor.tend()
        if supervisor.exit_codes and not late:
            # Work that arrives while the workers keep dying is run too.
            late.extend(add("test.echo", n) for n in range(6, 9))
        tasks = _tasks(enqueuer, [poison, *normal, *late])
        return tasks[poison].status.terminal and all(
            tasks[task_id].status is TaskStatus.SUCCEEDED for task_id in normal + late
        )

    wait_until(
        poison_failed_and_the_rest_ran,
        timeout=40,
        what="the poison task to fail and every other task to succeed",
    )

    # The worker that failed the poison task lives on: no restart since.
    assert supervisor.exit_codes == [1] * MAX_EXPIRIES
    assert supervisor.stop() == 0
    tasks = _tasks(enqueuer, [poison, *normal, *late])
    failed = tasks[poison]
    message = f"lease expired {MAX_EXPIRIES} times: the task may be crashing its runner"
    assert (failed.status, failed.last_error) == (TaskStatus.FAILED, message)
    assert failed.attempts == MAX_EXPIRIES < failed.max_attempts
    assert failed.finished_at is not None
    with enqueuer.db.read() as conn:
        history = store_attempts.list_attempts(conn, poison)
    numbers = list(range(1, MAX_EXPIRIES + 1))
    assert [(a.number, a.outcome) for a in history] == [
        (number, AttemptOutcome.LEASE_EXPIRED) for number in numbers
    ]
    assert [a.error for a in history] == ["lease expired"] * (MAX_EXPIRIES - 1) + [message]
    assert len({a.worker for a in history}) == MAX_EXPIRIES
    crashes = Path(enqueuer.settings.data_dir) / "crashes" / f"{poison}.txt"
    assert crashes.read_text(encoding="utf-8").splitlines() == [str(n) for n in numbers]
    for task_id in normal + late:
        assert (tasks[task_id].status, tasks[task_id].attempts) == (TaskStatus.SUCCEEDED, 1)
