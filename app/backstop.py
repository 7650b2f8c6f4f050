"""One Backstop instance: settings, database, registry, task client and runner, and how an
app takes it in: `lifespan` to start and stop it, `router` for its task API."""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI
from fastapi.concurrency import run_in_threadpool

from app import logs
from app.enqueue import TaskClient
from app.errors import BackstopError, TaskModuleError
from app.observability.metrics import BackstopCollector, TaskMetrics, registry_of
from app.runner.checkpointer import Checkpointer
from app.runner.periodic import Periodic
from app.runner.pruner import Pruner
from app.runner.runner import Runner
from app.settings import BUILTIN_TASKS, Settings
from app.tasks.registry import Registry, registry
from store import migrate
from store.engine import Database, create_engine

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

BUILTIN_MODULES = ("app.tasks.builtins",)


def import_task_modules(modules: list[str]) -> None:
    """Import the modules whose `@task` functions should register (the built-ins first)."""
    for name in (*BUILTIN_MODULES, *modules):
        try:
            importlib.import_module(name)
        except BackstopError:
            raise
        except Exception as error:
            raise TaskModuleError(
                f"BACKSTOP_TASK_MODULES: cannot import {name!r}: {type(error).__name__}: {error}"
            ) from error


def open_database(settings: Settings) -> Database:
    """The database the settings name, with their SQLite options."""
    return Database(
        create_engine(
            settings.url,
            synchronous=settings.sqlite_synchronous,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            postgres=settings.postgres,
        )
    )


class HeapFreeze:
    """Keeps the objects alive at start-up out of the garbage collector's full collections
    while a service serves.

    Modules, classes, the app and its registry live as long as the process, yet every full
    collection walks them all: about 120,000 objects, 60-80 ms, several times a second under
    load (objects of requests in flight get promoted and die old), and every request waits
    behind it. Frozen (`gc.freeze()`, after one collection), a full collection walks only
    what was made since. Counted: apps serving at once in one process share the freeze,
    and the last to stop thaws the heap, so that what it leaves behind can be collected.
    """

    def __init__(self) -> None:
        # The test kit turns this off: a suite starts and stops an app in nearly every test,
        # and the collection at each start would cost it more than freezing saves.
        self.enabled = True
        self._serving = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Frozen from the first of these blocks to enter to the last to leave."""
        if not self.enabled:
            yield
            return
        with self._lock:
            self._serving += 1
            if self._serving == 1:
                gc.collect()
                gc.freeze()
        try:
            yield
        finally:
            with self._lock:
                self._serving -= 1
                if self._serving == 0:
                    gc.unfreeze()


heap = HeapFreeze()


live: weakref.WeakSet[Backstop] = weakref.WeakSet()
"""Every Backstop instance alive in this process (the test kit finds an app's this way)."""


class Backstop:
    """Everything one process needs, built from settings (the environment's by default).

    An app takes it in through `lifespan(app)`, which migrates the database and starts the
    runner, and `router`, the task API; its endpoints enqueue through `DurableTasks`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        task_registry: Registry | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        settings = settings or Settings()
        self.settings = settings
        # The built-ins the settings switch off are unknown to this instance alone.
        switched_off = [name for name in BUILTIN_TASKS if name not in settings.builtins]
        self.registry = (task_registry or registry).without(switched_off)
        import_task_modules(settings.task_modules)
        self.db = open_database(settings)
        # This process's counts of task events, and the registry that `/metrics` serves.
        self.metrics = TaskMetrics()
        self.runner = Runner(
            self.db,
            self.registry,
            settings,
            metrics=self.metrics,
            tracer_provider=tracer_provider,
        )
        self.tasks = TaskClient(
            self.db,
            self.registry,
            wake=self.runner.notify,
            on_cancel=self.runner.cancel_local,
            timeout=settings.enqueue_timeout,
            metrics=self.metrics,
        )
        self.metrics_registry = registry_of(
            BackstopCollector(
                self.metrics,
                self.db,
                busy=lambda: len(self.runner.pipeline.running),
                capacity=lambda: self.runner.capacity,
                rate_limits=settings.rate_limits,
            )
        )
        self.periodic = Periodic(self.registry, self.runner)
        # Every second (or at the claim's pace when that is faster): a tick's task is enqueued
        # within a second of it, and a check that finds nothing due is one lock-free read.
        self.runner.add_job("periodic", self.periodic.tick, min(1.0, settings.poll_interval))
        self.pruner = Pruner(self.runner.write, settings)
        self.runner.add_job("prune", self.pruner.run, settings.prune_interval)
        self.checkpointer = Checkpointer(self.db)
        self._router: APIRouter | None = None
        self.freeze_heap = False
        live.add(self)

    @classmethod
    def of(cls, app: FastAPI) -> Backstop:
        """The Backstop of `app`: the one whose lifespan it entered (or `create_app` made)."""
        backstop = getattr(app.state, "backstop", None)
        if not isinstance(backstop, cls):
            raise RuntimeError(
                "this app has no Backstop: enter `backstop.lifespan(app)` in its lifespan"
                " (or build it with app.main.create_app)"
            )
        return backstop

    @property
    def router(self) -> APIRouter:
        """The task API (`/tasks...`, `/schedules`, `/readyz`) for `app.include_router`, under
        any prefix; Backstop's token, body limit and error answers apply to it alone."""
        if self._router is None:
            from app.api.router import build_router  # the routes depend on this module

            self._router = build_router(self)
        return self._router

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Run Backstop for as long as `app` serves: migrate the database, start the runner
        (unless `BACKSTOP_RUN_WORKER=false`), and at the end stop it gracefully.

        `FastAPI(lifespan=backstop.lifespan)`, or `async with backstop.lifespan(app):` inside
        the app's own lifespan. The app's endpoints then find this instance through
        `DurableTasks` (the first to enter, when several Backstops share one app).
        """
        # Here, not at import: the server has configured logging (or not) by now.
        logs.configure(self.settings)
        if getattr(app.state, "backstop", None) is None:
            app.state.backstop = self
        await run_in_threadpool(self.prepare)
        with_runner = self.settings.run_worker
        if with_runner:
            await self.runner.start()
        try:
            with self.serving():
                yield
        finally:
            try:
                if with_runner:
                    await self.runner.stop()
            finally:
                self.close()

    def prepare(self) -> None:
        """Create the data folder and bring the schema to the newest migration."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(self.db)

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """What a long-running process (the app, `backstop worker`) adds while it serves:
        WAL checkpoints away from the commits, and, in processes Backstop owns (`freeze_heap`:
        the standalone service, `backstop worker`), the start-up heap out of the garbage
        collector's way (`HeapFreeze`). A team's own app keeps its collector as it set it."""
        freezing = heap.frozen() if self.freeze_heap else contextlib.nullcontext()
        with self.checkpointer.running(), freezing:
            yield

    def close(self) -> None:
        """Stop the enqueue writer and close the database's connections."""
        self.tasks.close()
        self.db.dispose()
