"""`add_task(..., unique_key=)` from several processes at once, each through its own task
client (its group commits), on SQLite and PostgreSQL: one task per key, and every caller is
answered with it."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import random
import traceback
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.backstop import Backstop
from app.settings import Settings
from store import migrate
from store.engine import Database, temporary_database
from store.models import task_table

# Each process imports the app and its task modules first: seconds apiece on a busy machine.
pytestmark = pytest.mark.timeout(180)

KEYS = 60
PROCESSES = 3


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database on either engine."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/race.db"
        db = Database.from_url(url)
        migrate.upgrade(db)
        db.dispose()
        yield url
        return
    server: str = request.getfixturevalue("server")
    with temporary_database(server, "backstop_unique") as url:
        db = Database.from_url(url)
        migrate.upgrade(db)
        db.dispose()
        yield url


async def _add_all(backstop: Backstop, keys: list[str]) -> list[tuple[str, str]]:
    # Gathered: one turn of the loop, so the process's writer commits them as one group.
    ids = await asyncio.gather(
        *(backstop.tasks.add_task_async("test.noop", unique_key=key) for key in keys)
    )
    return list(zip(keys, ids, strict=True))


def _enqueue_in_process(
    url: str, data_dir: str, seed: int, meet: Barrier, out: multiprocessing.Queue[object]
) -> None:
    """Add a task under each key, in an order of this process's own; report `(key, id)`s."""
    try:
        settings = Settings(
            data_dir=Path(data_dir), database_url=url, task_modules=["tests.support.tasks"]
        )
        backstop = Backstop(settings)
        try:
            backstop.prepare()
            keys = [f"key-{n}" for n in range(KEYS)]
            random.Random(seed).shuffle(keys)
            meet.wait(timeout=30)
            out.put(asyncio.run(_add_all(backstop, keys)))
        finally:
            backstop.close()
    except BaseException:
        out.put(traceback.format_exc())
        raise


def test_processes_adding_tasks_with_the_same_keys_store_one_per_key(
    database_url: str, tmp_path: Path
) -> None:
    ctx = multiprocessing.get_context("spawn")
    meet = ctx.Barrier(PROCESSES)
    out: multiprocessing.Queue[object] = ctx.Queue()
    procs = [
        ctx.Process(
            target=_enqueue_in_process,
            args=(database_url, str(tmp_path / f"data-{n}"), n, meet, out),
        )
        for n in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [out.get(timeout=50) for _ in procs]
    except queue.Empty:
        pytest.fail("a process did not report in time")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    assert [report for report in reports if isinstance(report, str)] == []
    answered: dict[str, set[str]] = {}
    for report in reports:
        assert isinstance(report, list)
        for key, task_id in report:
            answered.setdefault(key, set()).add(task_id)
    db = Database.from_url(database_url)
    try:
        with db.read() as conn:
            rows = conn.execute(sa.select(task_table.c.unique_key, task_table.c.id)).all()
    finally:
        db.dispose()
    stored = {key: {task_id} for key, task_id in rows}
    assert len(rows) == KEYS  # one task per key
    assert answered == stored  # and every process was answered with it
