"""Two `backstop worker` processes under one rate limit, on one SQLite file and on PostgreSQL:
together they never start more of the limited queue's tasks than the limit in any window,
counted from the attempt history, while the other queue's tasks all run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from store import migrate
from store.engine import Database, temporary_database
from store.models import TaskStatus, attempt_table, task_table
from store.tasks import NewTask, enqueue_many
from tests.conftest import answering_server
from tests.support.waiting import wait_until

BACKSTOP = str(Path(sys.executable).parent / "backstop")
REPO = Path(__file__).resolve().parents[2]
LIMIT = 5
PERIOD = timedelta(seconds=1)
EMAILS = 35
OTHERS = 20


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new database of the test's own, on either engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'backstop.db'}"
        return
    with temporary_database(answering_server(), "backstop_rate") as url:
        yield url


def _worker(url: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.update(
        BACKSTOP_DATA_DIR=str(data_dir),
        BACKSTOP_DATABASE_URL=url,
        BACKSTOP_TASK_MODULES="tests.support.tasks",
        BACKSTOP_RATE_LIMITS=f"email={LIMIT}/1s",
        # Fewer slots than the allowance: neither process can take a whole window alone.
        BACKSTOP_CONCURRENCY="3",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            [BACKSTOP, "worker"], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def _most_in_a_window(starts: list[datetime]) -> int:
    """The most starts any window of PERIOD holds: (s - PERIOD, s] at each start s (a window
    holds the most when it ends on a start)."""
    starts = sorted(starts)
    return max(sum(1 for other in starts if start - PERIOD < other <= start) for start in starts)


def test_two_workers_never_exceed_the_rate_limit_together(
    database_url: str, tmp_path: Path
) -> None:
    db = Database.from_url(database_url)
    try:
        migrate.upgrade(db)
        with db.write() as conn:
            enqueue_many(conn, [NewTask("test.echo", [n], queue="email") for n in range(EMAILS)])
            enqueue_many(conn, [NewTask("test.echo", [n]) for n in range(OTHERS)])
        logs = [tmp_path / f"worker{n}.out" for n in range(2)]
        workers = [_worker(database_url, tmp_path / "data", log) for log in logs]
        try:

            def done(queue: str, count: int) -> bool:
                for worker, log in zip(workers, logs, strict=True):
                    assert worker.poll() is None, log.read_text()
                with db.read() as conn:
                    finished = conn.execute(
                        sa.select(sa.func.count()).where(
                            task_table.c.queue == queue,
                            task_table.c.status == TaskStatus.SUCCEEDED,
                        )
                    ).scalar_one()
                return bool(finished == count)

            wait_until(lambda: done("default", OTHERS), 30, "the default queue's tasks to run")
            wait_until(lambda: done("email", EMAILS), 60, "the email tasks to run")
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker, log in zip(workers, logs, strict=True):
                assert worker.wait(30) == 0, log.read_text()
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait(10)
        with db.read() as conn:
            starts = conn.execute(
                sa.select(attempt_table.c.started_at, attempt_table.c.worker)
                .join(task_table, task_table.c.id == attempt_table.c.task_id)
                .where(task_table.c.queue == "email")
            ).all()
    finally:
        db.dispose()
    assert len(starts) == EMAILS
    assert _most_in_a_window([start for start, _ in starts]) == LIMIT
    assert len({worker for _, worker in starts}) == 2, "one worker did all the work"
