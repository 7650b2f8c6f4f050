"""Each fixture of the test kit, used from a team's test files in a sub-session."""

from __future__ import annotations

import pytest

from tests.kit.conftest import RunKit

TASKS = """
from __future__ import annotations

import asyncio
import threading

from tenacity import retry_if_exception_type, wait_fixed

from app import TaskContext, task

RAN_ON: list[int] = []


class Flaky(Exception):
    pass


@task(name="kit.sync")
def sync_job(value: int) -> dict[str, int]:
    RAN_ON.append(threading.get_ident())
    return {"value": value}


@task(name="kit.async")
async def async_job(value: int) -> int:
    await asyncio.sleep(0)
    return value * 2


@task(name="kit.flaky", max_attempts=5, retry=retry_if_exception_type(Flaky), wait=wait_fixed(60))
def flaky(failures: int, ctx: TaskContext) -> int:
    if ctx.attempt <= failures:
        raise Flaky(f"attempt {ctx.attempt}")
    return ctx.attempt
"""


def test_each_test_gets_a_fresh_migrated_sqlite_database(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        test_database="""
        from pathlib import Path

        from app.settings import Settings
        from store import migrate
        from store.engine import Database

        SEEN = []


        def test_first(backstop_database_url, backstop_settings, tmp_path):
            assert backstop_database_url.startswith("sqlite:///")
            assert Path(backstop_database_url.removeprefix("sqlite:///")).is_relative_to(tmp_path)
            assert isinstance(backstop_settings, Settings)
            assert backstop_settings.url == backstop_database_url
            assert backstop_settings.run_worker is False
            assert backstop_settings.data_dir.is_dir()
            db = Database.from_url(backstop_database_url)
            try:
                assert migrate.is_current(db)
            finally:
                db.dispose()
            SEEN.append(backstop_database_url)


        def test_second(backstop_database_url):
            assert SEEN and backstop_database_url not in SEEN
        """
    )

    result = run_kit()

    result.assert_outcomes(passed=2)


def test_app_and_client_serve_the_api_without_starting_the_runner(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        tasks=TASKS,
        test_app="""
        import tasks
        from fastapi import FastAPI
        from fastapi.testclient import TestClient

        from app.backstop import Backstop


        def test_app_is_built_by_create_app_on_the_settings(backstop_app, backstop_settings):
            assert isinstance(backstop_app, FastAPI)
            backstop = backstop_app.state.backstop
            assert isinstance(backstop, Backstop)
            assert backstop.settings == backstop_settings


        def test_client_runs_the_lifespan_but_not_the_runner(backstop_client, backstop_app):
            assert isinstance(backstop_client, TestClient)
            assert backstop_client.app is backstop_app
            assert backstop_client.get("/readyz").status_code == 200
            response = backstop_client.post("/tasks", json={"name": "kit.sync", "args": [1]})
            assert response.status_code == 202
            assert backstop_app.state.backstop.runner._scheduler is None
            task = backstop_client.get(f"/tasks/{response.json()['id']}").json()
            assert task["status"] == "queued"
        """,
    )

    result = run_kit()

    result.assert_outcomes(passed=2)


def test_drain_runs_due_tasks_on_the_test_thread_and_leaves_no_thread_behind(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        tasks=TASKS,
        conftest="""
        import threading

        import pytest


        @pytest.fixture(autouse=True)
        def no_thread_left_behind():
            # Autouse: set up first, torn down last, after the kit's fixtures.
            before = set(threading.enumerate())
            yield
            left = set(threading.enumerate()) - before
            assert not left, f"threads left behind: {sorted(t.name for t in left)}"
        """,
        test_drain="""
        import threading

        import tasks
        from app.testing import Drain


        def test_drain_runs_every_due_task_and_returns_them(backstop_app, backstop_drain):
            assert isinstance(backstop_drain, Drain)
            client = backstop_app.state.backstop.tasks
            first = client.add_task(tasks.sync_job, 1)
            second = client.add_task(tasks.async_job, 21)
            before = set(threading.enumerate())

            done = backstop_drain()

            assert set(threading.enumerate()) == before
            assert {task.id: (task.status, task.result) for task in done} == {
                first: ("succeeded", {"value": 1}),
                second: ("succeeded", 42),
            }
            assert tasks.RAN_ON == [threading.get_ident()]
            assert backstop_drain() == []


        def test_drain_through_the_client(backstop_client, backstop_drain):
            response = backstop_client.post("/tasks", json={"name": "kit.sync", "args": [7]})
            # The app's own threads (its enqueue writer) are the client's; the drain adds none,
            # and the autouse check above sees them all gone once the client closes.
            before = set(threading.enumerate())

            [done] = backstop_drain()

            assert done.id == response.json()["id"]
            assert backstop_client.get(f"/tasks/{done.id}").json()["result"] == {"value": 7}
            assert set(threading.enumerate()) == before


        def test_a_task_enqueued_by_a_task_runs_in_the_same_drain(backstop_app, backstop_drain):
            from app import task

            client = backstop_app.state.backstop.tasks

            @task(name="kit.chain")
            def chain() -> None:
                client.add_task(tasks.sync_job, 2)

            client.add_task(chain)

            assert sorted(task.name for task in backstop_drain()) == ["kit.chain", "kit.sync"]


        def test_a_task_that_never_stops_enqueueing_is_reported(backstop_app, backstop_drain):
            import asyncio

            import pytest
            from app import task

            client = backstop_app.state.backstop.tasks

            @task(name="kit.forever")
            def forever() -> None:
                client.add_task("kit.forever")

            client.add_task(forever)

            with pytest.raises(RuntimeError, match="work keeps coming"):
                asyncio.run(backstop_drain.run(limit=20))
        """,
    )

    result = run_kit()

    result.assert_outcomes(passed=4)


def test_advance_runs_delays_and_retries_within_the_span_and_nothing_beyond(
    pytester: pytest.Pytester, run_kit: RunKit
) -> None:
    pytester.makepyfile(
        tasks=TASKS,
        test_advance="""
        from datetime import timedelta

        import tasks


        def test_advance(backstop_app, backstop_drain, backstop_tasks):
            client = backstop_app.state.backstop.tasks
            flaky = client.add_task(tasks.flaky, 2)  # fails twice; retries 60 s apart
            soon = client.add_task(tasks.sync_job, 1, delay=600)
            later = client.add_task(tasks.sync_job, 2, delay=7200)

            [first] = backstop_drain()
            assert (first.id, first.status, first.attempts) == (flaky, "retrying", 1)
            assert backstop_drain(advance=timedelta(seconds=30)) == []

            done = backstop_drain(advance=timedelta(minutes=15))

            assert {task.id: (task.status, task.attempts) for task in done} == {
                flaky: ("succeeded", 3),
                soon: ("succeeded", 1),
            }
            assert [item.id for item in backstop_tasks.enqueued()] == [later]
            [last] = backstop_drain(advance=timedelta(hours=3))
            assert last.id == later
        """,
    )

    result = run_kit()

    result.assert_outcomes(passed=1)


def test_drain_from_async_tests(pytester: pytest.Pytester, run_kit: RunKit) -> None:
    pytester.makepyfile(
        tasks=TASKS,
        test_async="""
        import asyncio
        from datetime import timedelta

        import pytest

        import tasks


        @pytest.fixture
        def anyio_backend():
            return "asyncio"  # not trio as well, which the dev extra brings (Selenium's)


        def test_await_run_inside_a_loop(backstop_app, backstop_drain):
            client = backstop_app.state.backstop.tasks
            client.add_task(tasks.async_job, 5)

            async def scenario():
                with pytest.raises(RuntimeError, match="await backstop_drain.run"):
                    backstop_drain()
                return await backstop_drain.run()

            assert [task.result for task in asyncio.run(scenario())] == [10]


        @pytest.mark.anyio
        async def test_an_anyio_test_awaits_the_drain(backstop_app, backstop_drain):
            client = backstop_app.state.backstop.tasks
            flaky = client.add_task(tasks.flaky, 1)

            [first] = await backstop_drain.run()
            [second] = await backstop_drain.run(advance=timedelta(minutes=2))

            assert (first.status, second.status, second.id) == ("retrying", "succeeded", flaky)
        """,
    )

    result = run_kit()

    result.assert_outcomes(passed=2)
