"""`ctx.progress`: held in memory, written at most every `INTERVAL` per runner, the last
value always written."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest
from sqlalchemy import event

from app.backstop import Backstop
from app.runner.progress import INTERVAL
from app.tasks.context import progress_value
from store.models import TaskStatus


def test_a_task_reporting_100000_times_is_written_a_few_times_a_second(
    backstop: Backstop,
) -> None:
    writes = 0

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        nonlocal writes
        if statement.startswith("UPDATE task SET progress"):
            writes += 1

    event.listen(backstop.db.engine, "before_cursor_execute", count)
    task_id = backstop.tasks.add_task("test.progress_storm", 100_000)
    started = time.monotonic()
    [task] = asyncio.run(backstop.runner.run_once())
    elapsed = time.monotonic() - started

    assert task.status == TaskStatus.SUCCEEDED
    assert task.progress == {"done": 100_000, "total": 100_000, "message": "storming"}
    # One write per interval at most, the first at once, and the last with the outcome.
    assert 1 <= writes <= math.ceil(elapsed / INTERVAL) + 2, (writes, elapsed)
    assert backstop.tasks.get(task_id).progress == task.progress


def test_the_inline_drain_writes_the_last_report_with_the_outcome(backstop: Backstop) -> None:
    from app.runner.runner import Runner

    runner = Runner(backstop.db, backstop.registry, backstop.settings, queues={}, inline=True)
    task_id = backstop.tasks.add_task("test.progress_storm", 1000)
    asyncio.run(runner.run_once())
    assert backstop.tasks.get(task_id).progress == {
        "done": 1000,
        "total": 1000,
        "message": "storming",
    }


def test_a_retry_starts_without_the_last_attempts_progress(backstop: Backstop) -> None:
    task_id = backstop.tasks.add_task("test.progress_storm", 3)
    asyncio.run(backstop.runner.run_once())
    with backstop.db.write() as conn:
        conn.exec_driver_sql("UPDATE task SET status = 'failed' WHERE id = ?", (task_id,))
    assert backstop.tasks.retry(task_id).progress is None


@pytest.mark.parametrize(
    ("done", "total", "message", "error"),
    [
        ("3", None, None, TypeError),
        (True, None, None, TypeError),
        (1, math.nan, None, ValueError),
        (1, 2, 3, TypeError),
    ],
)
def test_progress_refuses_what_is_not_a_number_or_text(
    done: Any, total: Any, message: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        progress_value(done, total, message)


def test_a_long_message_is_cut_and_a_lone_surrogate_replaced() -> None:
    value = progress_value(1.5, None, "\ud800" + "x" * 1000)
    assert value["done"] == 1.5
    assert value["message"] == "?" + "x" * 499
