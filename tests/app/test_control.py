"""`TaskClient.get/wait/cancel/retry` and their async twins, in one process (the e2e tests
wait on tasks that another process runs)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.backstop import Backstop
from app.enqueue import TaskClient
from app.errors import TaskCancelled, TaskFailed, WaitTimeout
from store import leases
from store.errors import InvalidTransition, TaskNotFound
from store.models import TaskStatus
from tests.support.waiting import wait_until

DEADLINE = 15.0


def test_the_async_twins_read_cancel_retry_and_wait(backstop: Backstop) -> None:
    tasks = backstop.tasks
    task_id = tasks.add_task("test.echo", 4)

    async def scenario() -> None:
        assert (await tasks.get_async(task_id)).status == TaskStatus.QUEUED
        assert (await tasks.cancel_async(task_id)).status == TaskStatus.CANCELLED
        with pytest.raises(TaskCancelled) as raised:
            await tasks.wait_async(task_id)
        assert isinstance(raised.value, TaskFailed)
        assert (raised.value.task_id, raised.value.status) == (task_id, TaskStatus.CANCELLED)
        assert (await tasks.retry_async(task_id)).status == TaskStatus.QUEUED
        waiting = asyncio.create_task(tasks.wait_async(task_id, timeout=30))
        await backstop.runner.run_once()
        assert await waiting == {"value": 4, "attempt": 1}
        with pytest.raises(WaitTimeout):
            await tasks.wait_async(tasks.add_task("test.noop"), timeout=0)

    asyncio.run(scenario())


def test_cancelling_a_running_task_stops_it_in_this_process(backstop: Backstop) -> None:
    stopped: list[str] = []  # what the runner's cancel_local would receive
    tasks = TaskClient(backstop.db, backstop.registry, on_cancel=stopped.append)
    try:
        task_id = tasks.add_task("test.noop")
        with backstop.db.write() as conn:
            leases.claim_due(conn, "here", 1, lease_seconds=30)

        assert tasks.cancel(task_id).status == TaskStatus.RUNNING  # asked to stop
        assert stopped == [task_id]
    finally:
        tasks.close()


def test_the_errors_are_the_stores(backstop: Backstop) -> None:
    tasks = backstop.tasks
    with pytest.raises(TaskNotFound):
        tasks.wait("no-such-task")
    with pytest.raises(TaskNotFound):
        tasks.cancel("no-such-task")
    with pytest.raises(InvalidTransition):
        tasks.retry(tasks.add_task("test.noop"))


def test_closing_the_client_ends_a_wait_without_a_limit(backstop: Backstop) -> None:
    task_id = backstop.tasks.add_task("test.noop")  # no runner: it never ends
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            backstop.tasks.wait(task_id)
        except BaseException as error:
            raised.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: backstop.tasks.watch.waiting(task_id), what="the wait to begin")
    backstop.tasks.close()
    waiter.join(DEADLINE)
    assert not waiter.is_alive()
    assert [type(error) for error in raised] == [RuntimeError]
