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
- `backstop_tasks`: what was enqueued, to assert on without running it
  (`assert_enqueued("email.send", to="ada@example.com", ...)`).

What it needs beyond Backstop is the `testing` extra: pytest, and httpx2 for the TestClient.
The reference is docs/testing.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import pytest

# Loaded in every pytest session of a venv that has Backstop, used or not: this module
# imports nothing but the standard library and pytest when it loads. The app, the store and
# the TestClient are imported by the fixtures that need them. The TestClient above all:
# Starlette warns when it is imported without httpx2, and a suite that turns warnings into
# errors would stop while loading this plugin.
if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.backstop import Backstop
    from app.enqueue import TaskRef
    from app.settings import Settings
    from app.tasks.registry import TaskSpec
    from store.models import Task, TaskStatus

DATABASE_ENV = "BACKSTOP_TEST_DATABASE_URL"
FACTORY_INI = "backstop_app_factory"
DEFAULT_FACTORY = "app.main:create_app"

AppFactory: TypeAlias = "Callable[[Settings], FastAPI]"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A suite starts an app in nearly every test: it does not freeze the heap at each."""
    _stop_freezing()


def _stop_freezing() -> None:
    # Only once Backstop is loaded: a session that does not use it never imports it.
    service = sys.modules.get("app.backstop")
    if service is not None:
        service.heap.enabled = False


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
    import sqlalchemy as sa

    from store.engine import temporary_database

    server = os.environ.get(DATABASE_ENV, "").strip()
    if not server:
        yield f"sqlite:///{tmp_path / 'backstop' / 'backstop.db'}"
        return
    url = sa.make_url(server)
    if url.get_backend_name() != "postgresql":
        raise pytest.UsageError(f"{DATABASE_ENV} must name a PostgreSQL server, not {server!r}")
    with temporary_database(server, "backstop_test") as database_url:
        yield database_url


@pytest.fixture
def backstop_settings(tmp_path: Path, backstop_database_url: str) -> Settings:
    """Settings on the test's own migrated database; the runner does not start."""
    from app.settings import Settings
    from store import migrate
    from store.engine import Database

    settings = Settings(
        data_dir=tmp_path / "backstop",
        database_url=backstop_database_url,
        run_worker=False,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # on PostgreSQL too: tasks write there
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
def backstop_app(
    backstop_settings: Settings, backstop_app_factory: AppFactory
) -> Iterator[FastAPI]:
    """The app under test on the test's database, its runner not started."""
    from app import backstop as backstop_module
    from app.backstop import Backstop

    _stop_freezing()
    before = set(backstop_module.live)
    app = backstop_app_factory(backstop_settings)
    if not isinstance(getattr(app.state, "backstop", None), Backstop):
        # An app that mounts Backstop finds its instance when its lifespan starts; the kit
        # needs it before: the one the factory made on the kit's settings.
        made = [
            backstop
            for backstop in set(backstop_module.live) - before
            if backstop.settings.url == backstop_settings.url
        ]
        if len(made) != 1:
            raise pytest.UsageError(
                "the app factory must build one Backstop on the settings it is given:"
                " Backstop(settings), or app.main.create_app(settings)"
            )
        app.state.backstop = made[0]
    yield app
    # The lifespan closes the database when a client ran it; a test that only drains or
    # reads tasks never starts the app, and its pooled connections would outlive the test.
    _backstop(app).close()


@pytest.fixture
def backstop_client(backstop_app: FastAPI) -> Iterator[TestClient]:
    """A TestClient for the app under test (its lifespan runs; its runner does not)."""
    from fastapi.testclient import TestClient

    before = set(threading.enumerate())
    with TestClient(backstop_app) as client:
        yield client
    # The client's event loop has ended and told its AnyIO worker threads (sync endpoints
    # and the lifespan's migration ran there) to stop, but nothing waits for them: wait
    # here, so that no thread outlives the test. Only threads of a finished loop.
    for thread in set(threading.enumerate()) - before:
        root = getattr(thread, "root_task", None)
        if thread.name == "AnyIO worker thread" and root is not None and root.done():
            thread.join(timeout=10)


def _backstop(app: FastAPI) -> Backstop:
    from app.backstop import Backstop

    return Backstop.of(app)


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
        from app.runner.runner import Runner
        from store import tasks as store_tasks
        from store.timeutil import utcnow

        backstop = self.backstop
        runner = Runner(
            backstop.db,
            backstop.registry,
            backstop.settings,
            queues={},
            worker_id="backstop-drain",
            inline=True,
        )
        span = advance or timedelta(0)
        ran: dict[str, Task] = {}
        attempts = 0
        while True:
            with backstop.db.read() as conn:
                due = store_tasks.next_due_at(conn)
            # The horizon follows the real clock: a task that a task enqueued during the
            # drain is due now, later than when the drain began.
            if due is None or due > utcnow() + span:
                break
            # The clock moves on to the next due task, never back: a retry's wait is
            # counted from the failed attempt, as it would be in real time.
            clock = max(utcnow(), due)
            batch = await runner.run_once(now=clock)
            if not batch:
                break  # due, yet not claimable: another runner holds it
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
    """A task as a test sees it: what to run and with what.

    `args` and `kwargs` are as stored (JSON); `arguments` holds the same values by parameter
    name, however the caller passed them (positional ones by index for a task this process
    does not know).
    """

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    arguments: dict[str, Any]
    status: TaskStatus
    queue: str
    scheduled_at: datetime
    task: Task

    def __str__(self) -> str:
        return f"{_call(self.name, self.arguments)}  [{self.status}]"


def _call(name: str, arguments: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def _by_name(
    spec: TaskSpec | None, args: list[Any], kwargs: dict[str, Any], *, defaults: bool = False
) -> dict[str, Any]:
    """Arguments by parameter name (with the signature's defaults filled in, if asked)."""
    bound = None
    if spec is not None:
        with contextlib.suppress(TypeError):
            bound = spec.signature.bind_partial(*args, **kwargs)
    if bound is None:
        return {**{str(index): value for index, value in enumerate(args)}, **kwargs}
    if defaults:
        bound.apply_defaults()
    return dict(bound.arguments)


class TaskLog:
    """What the app under test enqueued; see `backstop_tasks`."""

    def __init__(self, backstop: Backstop) -> None:
        self.backstop = backstop

    def _spec(self, name: str) -> TaskSpec | None:
        registry = self.backstop.registry
        return registry.get(name) if name in registry else None

    def all(
        self, name: TaskRef | None = None, *, status: TaskStatus | None = None
    ) -> list[Enqueued]:
        """Every task (of `name`, in `status`), oldest first."""
        from store import tasks as store_tasks

        if name is not None and not isinstance(name, str):
            name = self.backstop.registry.resolve(name).name
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
            Enqueued(
                t.id,
                t.name,
                t.args,
                t.kwargs,
                _by_name(self._spec(t.name), t.args, t.kwargs),
                t.status,
                t.queue,
                t.scheduled_at,
                t,
            )
            for t in reversed(found)
        ]

    def enqueued(self, name: TaskRef | None = None) -> list[Enqueued]:
        """The tasks still waiting to run (queued or retrying), oldest first."""
        from store.models import TaskStatus

        return [
            item
            for item in self.all(name)
            if item.status in (TaskStatus.QUEUED, TaskStatus.RETRYING)
        ]

    def assert_enqueued(self, name: TaskRef, /, *args: Any, **kwargs: Any) -> Enqueued:
        """The one waiting task `name` with exactly these arguments; fails the test if
        there is none or more than one.

        Arguments compare as stored (JSON) and by parameter name: positional or keyword,
        and a default left out or passed, make no difference. `name` is positional only,
        so a task may have a parameter called `name` too.
        """
        __tracebackhide__ = True
        from app.errors import InvalidArguments

        if not isinstance(name, str):
            name = self.backstop.registry.resolve(name).name
        spec = self._spec(name)
        expected_args, expected_kwargs = list(args), dict(kwargs)
        if spec is not None:
            problem: str | None = None
            try:
                expected_args, expected_kwargs = spec.check(expected_args, expected_kwargs)
            except InvalidArguments as exc:
                problem = str(exc)
            if problem is not None:  # outside the `except`: no chained traceback
                pytest.fail(f"assert_enqueued: {problem}")
        wanted = _by_name(spec, expected_args, expected_kwargs, defaults=True)
        waiting = self.enqueued(name)
        matches = [
            item
            for item in waiting
            if _by_name(spec, item.args, item.kwargs, defaults=True) == wanted
        ]
        if len(matches) == 1:
            return matches[0]
        expected = _call(name, _by_name(spec, expected_args, expected_kwargs))
        lines = [f"expected one waiting task {expected}, found {len(matches)}"]
        if waiting:
            lines.append(f"waiting {name!r} tasks ({len(waiting)}):")
            lines.extend(f"  {item}" for item in waiting)
        else:
            others = sorted({item.name for item in self.enqueued()})
            lines.append(
                f"no {name!r} task is waiting; waiting tasks: {', '.join(others)}"
                if others
                else f"no {name!r} task is waiting; no task is waiting at all"
            )
        still = {item.id for item in waiting}
        done = [item for item in self.all(name) if item.id not in still]
        if done:
            lines.append(f"{name!r} tasks no longer waiting ({len(done)}):")
            lines.extend(f"  {item}" for item in done)
        pytest.fail("\n".join(lines))


@pytest.fixture
def backstop_tasks(backstop_app: FastAPI) -> TaskLog:
    """What was enqueued: `backstop_tasks.enqueued("email.send")`, `.assert_enqueued(...)`."""
    return TaskLog(_backstop(backstop_app))
