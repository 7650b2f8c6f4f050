"""How fast one runner process drains a backlog of no-op tasks (sync and async).

    .venv/bin/python -m bench.drain [--tasks 5000] [--concurrency 8]

Prints tasks per second for each kind. Figures only: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from app import task
from app.service import Backstop
from app.settings import Settings
from store import tasks as store_tasks
from store.models import TaskStatus
from store.tasks import NewTask


@task(name="bench.noop")
def noop() -> None:
    """Does nothing, on a thread."""


@task(name="bench.async_noop")
async def async_noop() -> None:
    """Does nothing, on the loop."""


async def drain(backstop: Backstop, name: str, count: int) -> float:
    with backstop.db.write() as conn:
        store_tasks.enqueue_many(conn, [NewTask(name=name) for _ in range(count)])
    start = time.perf_counter()
    await backstop.runner.start()
    while True:
        with backstop.db.read() as conn:
            done = store_tasks.count_by_status(conn)[TaskStatus.SUCCEEDED]
        if done >= count:
            break
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    await backstop.runner.stop()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    options = parser.parse_args()
    for name in ("bench.noop", "bench.async_noop"):
        with tempfile.TemporaryDirectory() as folder:
            settings = Settings(
                data_dir=Path(folder), concurrency=options.concurrency, poll_interval=0.05
            )
            backstop = Backstop(settings)
            backstop.prepare()
            rate = asyncio.run(drain(backstop, name, options.tasks))
            backstop.close()
        print(f"{name:18} {options.tasks} tasks  {rate:8.0f} tasks/s")


if __name__ == "__main__":
    main()
