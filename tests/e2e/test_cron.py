"""Periodic tasks across real processes: three `backstop worker`s, one task per tick.

Each worker checks the schedules twenty times a second, so all three find every tick due
within a few milliseconds of one another; the database must still hold one task per tick,
and exactly one process must have stored it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from app.tasks.recurrence import tick_key
from store import tasks as store_tasks
from store.engine import Database
from store.models import Task, TaskStatus
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
BACKSTOP = Path(sys.executable).parent / "backstop"
NAME = "test.every_second"
WORKERS = 3
TICKS = 4
ENQUEUED = re.compile(rf"enqueued periodic {re.escape(NAME)} for (\S+ \S+)")


class Worker:
    """One `backstop worker` process; its output goes to `log_path`."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.log_path = log_path
        env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
        env.update(
            BACKSTOP_DATA_DIR=str(data_dir),
            BACKSTOP_TASK_MODULES="tests.support.periodic",
            BACKSTOP_POLL_INTERVAL="0.05",
            BACKSTOP_SHUTDOWN_GRACE="5",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BACKSTOP), "worker"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def started(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"worker exited with {self.process.returncode}:\n{self.log()}")
        return "started (queues" in self.log()

    def enqueued(self) -> list[datetime]:
        """The ticks this worker's log says it stored a task for."""
        return [datetime.fromisoformat(stamp) for stamp in ENQUEUED.findall(self.log())]

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self) -> int:
        return self.process.wait(timeout=15)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    """Three workers on one data folder; killed if still running, their logs printed."""
    data_dir = tmp_path / "data"
    started = [Worker(data_dir, tmp_path / f"worker-{n}.log") for n in range(1, WORKERS + 1)]
    try:
        yield started
    finally:
        for number, worker in enumerate(started, start=1):
            worker.close()
            print(f"----- worker {number} log -----")
            print(worker.log()[-6000:])


def periodic_tasks(data_dir: Path) -> list[Task]:
    db = Database.from_url(f"sqlite:///{data_dir}/backstop.db")
    try:
        with db.read() as conn:
            return store_tasks.list_tasks(conn, name=NAME, limit=500).items
    finally:
        db.dispose()


def test_three_workers_enqueue_exactly_one_task_per_tick(
    workers: list[Worker], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    wait_until(lambda: all(w.started() for w in workers), timeout=20, what="three workers")
    all_running = datetime.now(UTC)

    def contended_ticks() -> int:
        return sum(task.scheduled_at > all_running for task in periodic_tasks(data_dir))

    wait_until(
        lambda: contended_ticks() >= TICKS,
        timeout=10,
        what=f"{TICKS} ticks enqueued while all three workers ran",
    )
    for worker in workers:
        worker.terminate()
    assert [worker.wait() for worker in workers] == [0] * WORKERS

    tasks = periodic_tasks(data_dir)
    ticks = sorted(task.scheduled_at for task in tasks)
    keys = {task.idempotency_key for task in tasks}
    assert len(keys) == len(tasks) == len(ticks) >= TICKS
    assert keys == {tick_key(NAME, tick) for tick in ticks}
    assert all(tick.microsecond == 0 for tick in ticks)
    gaps = {later - earlier for earlier, later in pairwise(ticks)}
    assert gaps == {timedelta(seconds=1)}, "from the first tick on, none skipped or doubled"
    # Each tick's task was stored by exactly one of the three processes.
    stored_by = Counter(tick for worker in workers for tick in worker.enqueued())
    assert stored_by == Counter(ticks)
    # And each that ran, ran once.
    for task in tasks:
        if task.status == TaskStatus.SUCCEEDED:
            run_file = data_dir / "periodic" / f"{task.id}.txt"
            assert run_file.read_text(encoding="utf-8") == "1\n"
