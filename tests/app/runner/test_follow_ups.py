"""`ctx.add_task` and `after=` through the runner: follow-ups exist with their parent's
success only, and a child runs after its parents (the kill test: tests/e2e)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlmodel import Session

from app.backstop import Backstop
from app.errors import InvalidSchedule
from app.testing import Drain
from store.errors import TaskNotFound, UnknownParents
from store.models import TaskStatus


def _drain(backstop: Backstop) -> None:
    Drain(backstop)()


def test_follow_ups_run_after_their_parents_success(backstop: Backstop) -> None:
    parent = backstop.tasks.add_task("test.fan_out", 3)
    _drain(backstop)
    done = backstop.tasks.get(parent)
    assert done.status is TaskStatus.SUCCEEDED
    *fanned, join = done.result
    children = [backstop.tasks.get(task_id) for task_id in done.result]
    assert [(c.status, c.parent_id) for c in children] == [(TaskStatus.SUCCEEDED, parent)] * 4
    assert backstop.tasks.get(join).after == fanned
    # The join ran once all three had succeeded: it started after each of them finished.
    started = backstop.tasks.get(join).started_at
    assert started is not None
    assert all(c.finished_at is not None and c.finished_at <= started for c in children[:3])


def test_a_failed_attempt_leaves_no_follow_up(backstop: Backstop) -> None:
    parent = backstop.tasks.add_task("test.add_then_fail")
    _drain(backstop)
    assert backstop.tasks.get(parent).status is TaskStatus.FAILED
    with backstop.db.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM task").scalar_one() == 1


def test_a_follow_up_of_an_unknown_task_fails_the_attempt_at_the_call(backstop: Backstop) -> None:
    parent = backstop.tasks.add_task("test.add_unknown")
    _drain(backstop)
    failed = backstop.tasks.get(parent)
    assert failed.status is TaskStatus.FAILED
    assert failed.last_error is not None
    assert "unknown task 'test.nobody_registered_this'" in failed.last_error


def test_a_child_of_a_failed_parent_ends_cancelled(backstop: Backstop) -> None:
    parent = backstop.tasks.add_task("test.add_then_fail")
    child = backstop.tasks.add_task("test.noop", after=[parent])
    grandchild = backstop.tasks.add_task("test.noop", after=[child])
    _drain(backstop)
    ended = backstop.tasks.get(child)
    assert (ended.status, ended.last_error, ended.attempts) == (
        TaskStatus.CANCELLED,
        f"parent task {parent} failed",
        0,
    )
    assert backstop.tasks.get(grandchild).last_error == f"parent task {child} was cancelled"


def test_a_child_of_a_cancelled_parent_ends_cancelled(backstop: Backstop) -> None:
    parent = backstop.tasks.add_task("test.noop", delay=3600)
    child = backstop.tasks.add_task("test.noop", after=[parent])
    backstop.tasks.cancel(parent)
    ended = backstop.tasks.get(child)
    assert (ended.status, ended.last_error) == (
        TaskStatus.CANCELLED,
        f"parent task {parent} was cancelled",
    )
    # After a parent that is cancelled already: stored cancelled at once.
    late = backstop.tasks.enqueue("test.noop", after=[parent])
    assert (late.status, late.last_error) == (
        TaskStatus.CANCELLED,
        f"parent task {parent} was cancelled",
    )


def test_a_child_of_several_parents_runs_only_after_all_succeeded(backstop: Backstop) -> None:
    first = backstop.tasks.add_task("test.noop")
    later = backstop.tasks.add_task("test.noop", delay=3600)
    child = backstop.tasks.enqueue("test.noop", after=[first, later])
    assert (child.status, child.waiting_on, child.after) == (
        TaskStatus.QUEUED,
        2,
        [first, later],
    )
    _drain(backstop)
    assert backstop.tasks.get(child.id).waiting_on == 1
    assert backstop.tasks.get(child.id).status is TaskStatus.QUEUED
    Drain(backstop)(advance=timedelta(hours=2))
    assert backstop.tasks.get(child.id).status is TaskStatus.SUCCEEDED


def test_after_refuses_unknown_ids_and_too_many(backstop: Backstop) -> None:
    known = backstop.tasks.add_task("test.noop")
    with pytest.raises(UnknownParents, match="no task 'missing'"):
        backstop.tasks.add_task("test.noop", after=[known, "missing"])
    with pytest.raises(InvalidSchedule, match="at most 100"):
        backstop.tasks.add_task("test.noop", after=[f"id-{n}" for n in range(101)])
    with pytest.raises(InvalidSchedule, match="a list of task ids"):
        backstop.tasks.add_task("test.noop", after=known)
    with backstop.db.read() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM task").scalar_one() == 1


def test_add_task_async_takes_after(backstop: Backstop) -> None:
    parent = backstop.tasks.add_task("test.noop")

    async def enqueue() -> str:
        return await backstop.tasks.add_task_async("test.noop", after=[parent])

    child = asyncio.run(enqueue())
    assert backstop.tasks.get(child).waiting_on == 1
    _drain(backstop)
    assert backstop.tasks.get(child).status is TaskStatus.SUCCEEDED


def test_after_in_the_callers_session_commits_and_rolls_back_with_it(backstop: Backstop) -> None:
    parent = backstop.tasks.add_task("test.noop")
    with Session(backstop.db.engine) as session:
        rolled_back = backstop.tasks.add_task("test.noop", session=session, after=[parent])
        session.rollback()
    with Session(backstop.db.engine) as session:
        child = backstop.tasks.add_task("test.noop", session=session, after=[parent])
        session.commit()
    assert backstop.tasks.get(child).waiting_on == 1
    with pytest.raises(TaskNotFound):
        backstop.tasks.get(rolled_back)
    _drain(backstop)
    assert backstop.tasks.get(child).status is TaskStatus.SUCCEEDED
