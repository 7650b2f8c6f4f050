"""Periodic tasks for the tests; processes the tests start import this module through
`BACKSTOP_TASK_MODULES=tests.support.periodic`.

Kept apart from `tests.support.tasks`, which every test process imports: a schedule there
would have every started runner of every test enqueue it once a second.
"""

from __future__ import annotations

from pathlib import Path

from app import TaskContext, task


@task(name="test.every_second", every=1)
def every_second(ctx: TaskContext) -> int:
    """Records that it ran (one file per task, one line per attempt) and returns the attempt."""
    folder = Path(ctx.settings.data_dir) / "periodic"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{ctx.task_id}.txt").open("a", encoding="utf-8") as out:
        out.write(f"{ctx.attempt}\n")
    return ctx.attempt


@task(name="test.every_five_minutes", cron="*/5 * * * *")
def every_five_minutes() -> None:
    """Does nothing, every five minutes."""
