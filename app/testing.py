"""Backstop's pytest plugin: test your own tasks and endpoints against a temporary database.

Active as soon as the project is installed (the `pytest11` entry point). Each test that asks
for one of these fixtures gets a fresh, migrated database: a SQLite file in the test's
`tmp_path`, or, when `BACKSTOP_TEST_DATABASE_URL` names a PostgreSQL server, a database of
its own created there and dropped afterwards.

- `backstop_settings`: settings on that database, runner off.
- `backstop_app`: the app from the factory (`create_app()`, or the ini option
  `backstop_app_factory = "myservice.main:create_app"`, or an overridden
  `backstop_app_factory` fixture), built on those settings.
- `backstop_client`: a `TestClient` for it.
- `backstop_drain`: runs every due task to completion in the test's own thread and loop;
  `backstop_drain(advance=timedelta(minutes=5))` also runs what falls due within that span
  (delays, retries) without waiting for the clock.
- `backstop_tasks`: what was enqueued, to assert on without running it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.runner import Runner
from app.service import Backstop
from app.settings import Settings
from store import migrate
from store import tasks as store_tasks
from store.engine import Database
from store.models import Task, TaskStatus
from store.timeutil import utcnow

DATABASE_ENV = "BACKSTOP_TEST_DATABASE_URL"
FACTORY_INI = "backstop_app_factory"
DEFAULT_FACTORY = "app.main:create_app"

AppFactory = Callable[[Settings], FastAPI]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        FACTORY_INI,
        "module:function that builds the app under test from Backstop Settings",
        default=DEFAULT_FACTORY,
    )


# -- the database ------------------------------------------------------------------------


@pytest.fixture
def backstop_database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh database for this test: SQLite under tmp_path, or a new PostgreSQL database
    on the server `BACKSTOP_TEST_DATABASE_URL` names (dropped after the test)."""
    server = os.environ.get(DATABASE_ENV, "").strip()
    if not server:
        yield f"sqlite:///{tmp_path / 'backstop' / 'backstop.db'}"
        return
    url = sa.make_url(server)
    if url.get_backend_name() != "postgresql":
        raise pytest.UsageError(f"{DATABASE_ENV} must name a PostgreSQL server, not {server!r}")
    name = f"backstop_test_{uuid4().hex[:16]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def backstop_settings(tmp_path: Path, backstop_database_url: str) -> Settings:
    """Settings on the test's own migrated database; the runner does not start."""
    settings = Settings(
        data_dir=tmp_path / "backstop",
        database_url=backstop_database_url,
        run_worker=False,
    )
    db = Database.from_url(settings.url)
    try:
        migrate.upgrade(db)
    finally:
        db.dispose()
    return settings


# -- the app -----------------------------------------------------------------------------


def load_factory(path: str) -> AppFactory:
    """The callable at `module:function`."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise pytest.UsageError(f"{FACTORY_INI} must look like 'module:function', not {path!r}")
    factory: AppFactory = getattr(importlib.import_module(module_name), attribute)
    return factory


@pytest.fixture
def backstop_app_factory(pytestconfig: pytest.Config) -> AppFactory:
    """Builds the app under test from settings; override it, or set the ini option."""
    return load_factory(str(pytestconfig.getini(FACTORY_INI)))


@pytest.fixture
def backstop_app(backstop_settings: Settings, backstop_app_factory: AppFactory) -> FastAPI:
    """The app under test on the test's database, its runner not started."""
    app = backstop_app_factory(backstop_settings)
    if not isinstance(getattr(app.state, "backstop", None), Backstop):
        raise pytest.UsageError(
            "the app factory must build its app with app.main.create_app(settings)"
        )
    return app


@pytest.fixture
def backstop_client(backstop_app: FastAPI) -> Iterator[TestClient]:
    """A TestClient for the app under test (its lifespan runs; its runner does not)."""
    with TestClient(backstop_app) as client:
        yield client


def _backstop(app: FastAPI) -> Backstop:
    backstop: Backstop = app.state.backstop
    return backstop


# -- running tasks -----------------------------------------------------------------------


class Drain:
    """Runs due tasks to completion on the caller's thread; see `backstop_drain`."""

    def __init__(self, backstop: Backstop) -> None:
        self.backstop = backstop

    def __call__(self, *, advance: timedelta | None = None) -> list[Task]:
        """Run every due task (and, with `advance`, every task due within that span) to
        completion; the tasks it ran, as they ended. From an async test, await `run`."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run(advance=advance))
        raise RuntimeError("an event loop is running: use `await backstop_drain.run()`")

    async def run(self, *, advance: timedelta | None = None, limit: int = 10_000) -> list[Task]:
        """`backstop_drain(...)` for async tests: runs on the test's own loop.

        Stops with an error after `limit` attempts: a task that enqueues itself forever.
        """
        backstop = self.backstop
        runner = Runner(
            backstop.db,
            backstop.registry,
            backstop.settings,
            queues={},
            worker_id="backstop-drain",
            inline=True,
        )
        horizon = utcnow() + (advance or timedelta(0))
        ran: dict[str, Task] = {}
        attempts = 0
        while True:
            with backstop.db.read() as conn:
                due = store_tasks.next_due_at(conn)
            if due is None or due > horizon:
                break
            # The clock moves on to the next due task, never back: a retry's wait is
            # counted from the failed attempt, as it would be in real time.
            clock = max(utcnow(), due)
            batch = await runner.run_once(now=clock)
            ran.update((task.id, task) for task in batch)
            attempts += len(batch)
            if attempts >= limit:
                raise RuntimeError(f"drained {attempts} attempts and work keeps coming")
        return list(ran.values())


@pytest.fixture
def backstop_drain(backstop_app: FastAPI) -> Drain:
    """`backstop_drain()` runs due tasks to completion; `advance=` runs what falls due later."""
    return Drain(_backstop(backstop_app))


# -- asserting on tasks ------------------------------------------------------------------


@dataclass(frozen=True)
class Enqueued:
    """A task as a test sees it: what to run and with what."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    status: TaskStatus
    queue: str
    scheduled_at: datetime
    task: Task


class TaskLog:
    """What the app under test enqueued; see `backstop_tasks`."""

    def __init__(self, backstop: Backstop) -> None:
        self.backstop = backstop

    def all(self, name: str | None = None, *, status: TaskStatus | None = None) -> list[Enqueued]:
        """Every task (of `name`, in `status`), oldest first."""
        found: list[Task] = []
        cursor = None
        with self.backstop.db.read() as conn:
            while True:
                page = store_tasks.list_tasks(
                    conn, name=name, status=status, limit=500, cursor=cursor
                )
                found.extend(page.items)
                cursor = page.next_cursor
                if cursor is None:
                    break
        return [
            Enqueued(t.id, t.name, t.args, t.kwargs, t.status, t.queue, t.scheduled_at, t)
            for t in reversed(found)
        ]

    def enqueued(self, name: str | None = None) -> list[Enqueued]:
        """The tasks still waiting to run (queued or retrying), oldest first."""
        return [
            item
            for item in self.all(name)
            if item.status in (TaskStatus.QUEUED, TaskStatus.RETRYING)
        ]

    def assert_enqueued(self, name: str, *args: Any, **kwargs: Any) -> Enqueued:
        """The one waiting task `name` with exactly these arguments; fails the test if
        there is none or more than one. Arguments compare as stored (JSON)."""
        waiting = self.enqueued(name)
        matches = [item for item in waiting if item.args == list(args) and item.kwargs == kwargs]
        if len(matches) != 1:
            seen = [(item.args, item.kwargs) for item in waiting] or "none"
            pytest.fail(
                f"expected one waiting {name!r} task with args={list(args)!r} "
                f"kwargs={kwargs!r}, found {len(matches)}; waiting {name!r} tasks: {seen}"
            )
        return matches[0]


@pytest.fixture
def backstop_tasks(backstop_app: FastAPI) -> TaskLog:
    """What was enqueued: `backstop_tasks.enqueued("email.send")`, `.assert_enqueued(...)`."""
    return TaskLog(_backstop(backstop_app))
