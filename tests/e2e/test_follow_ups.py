"""Follow-ups are committed with their parent's success, in real processes: a runner killed
after the function returned but before its outcome was written leaves no follow-up, and the
retry creates each one exactly once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from store.models import TaskStatus
from tests.e2e.test_restarts import Servers, read_tasks
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e


def _all_tasks(data_dir: Path) -> list[tuple[str, str, str | None]]:
    """(id, status, parent_id) of every task, read straight from the file."""
    with sqlite3.connect(data_dir / "backstop.db") as conn:
        rows = conn.execute("SELECT id, status, parent_id FROM task ORDER BY id").fetchall()
    return [(row[0], row[1], row[2]) for row in rows]


def test_a_runner_killed_before_its_success_is_written_leaves_no_follow_up(
    servers: Servers, data_dir: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    first = servers.start(data_dir)
    parent = first.enqueue("test.fan_out_gated", 2, str(gate))
    wait_until(
        lambda: (data_dir / "started" / f"{parent}.txt").exists(),
        timeout=10,
        what="the parent's function to start",
    )
    # Hold SQLite's write lock, so that no outcome can be written; then let the function
    # return, and kill its runner once it has.
    blocker = sqlite3.connect(data_dir / "backstop.db", isolation_level=None, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        gate.touch()
        wait_until(
            lambda: (data_dir / "returned" / f"{parent}.txt").exists(),
            timeout=10,
            what="the parent's function to return",
        )
        first.kill()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    # Its success was never written, so neither was any follow-up.
    assert _all_tasks(data_dir) == [(parent, TaskStatus.RUNNING.value, None)]

    second = servers.start(data_dir)
    wait_until(
        lambda: second.task(parent)["status"] == "succeeded",
        timeout=30,
        what="the parent to run again once its lease expired, and succeed",
    )
    done = second.task(parent)
    assert done["attempts"] == 2
    follow_ups = done["result"]
    assert len(follow_ups) == 3
    wait_until(
        lambda: all(second.task(i)["status"] == "succeeded" for i in follow_ups),
        timeout=30,
        what="the follow-ups to run",
    )
    # Each follow-up exists once: those of the second attempt, and no others.
    rows = _all_tasks(data_dir)
    assert sorted(task_id for task_id, _, _ in rows) == sorted([parent, *follow_ups])
    assert {parent_id for task_id, _, parent_id in rows if task_id != parent} == {parent}
    lines = (data_dir / "returned" / f"{parent}.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["attempt 1", "attempt 2"]
    stored = read_tasks(data_dir, follow_ups)
    assert stored[follow_ups[-1]].after == follow_ups[:-1]
