"""The app the HTTP benchmarks serve: the same endpoint with FastAPI's BackgroundTasks, with
Backstop's DurableTasks, and with the issue's reference design (one shared sqlite3
connection, BEGIN IMMEDIATE, a commit per request), side by side in one app so all run on
the same server.

    uvicorn --factory bench.apps:build
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from datetime import UTC, datetime

from fastapi import BackgroundTasks, FastAPI, Request, status

from app import DurableTasks
from app.main import create_app
from bench.tasks import noop as durable_noop

# The row Backstop's enqueue stores for `bench.noop`, with the same indexes to update: what
# differs from Backstop is only how the row gets there.
REFERENCE_INSERT = (
    "INSERT INTO task (id, name, status, queue, priority, args, kwargs, attempts,"
    " max_attempts, created_at, scheduled_at, lease_token, expirations)"
    " VALUES (?1, 'bench.noop', 'queued', 'default', 0, '[]', '{}', 0, 5, ?2, ?2, 0, 0)"
)
STAMP = "%Y-%m-%d %H:%M:%S.%f"  # how Backstop stores a time on SQLite (naive UTC)


class Reference:
    """The issue's reference enqueue: every request inserts its row on one sqlite3
    connection shared by the process, in a `BEGIN IMMEDIATE` transaction of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def enqueue(self, request: Request) -> str:
        task_id = str(uuid.uuid4())
        now = datetime.now(UTC).replace(tzinfo=None).strftime(STAMP)
        with self._lock:
            conn = self._conn or self._connect(request)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(REFERENCE_INSERT, (task_id, now))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return task_id

    def _connect(self, request: Request) -> sqlite3.Connection:
        backstop = request.app.state.backstop
        conn = sqlite3.connect(
            backstop.db.engine.url.database, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA synchronous={backstop.settings.sqlite_synchronous}")
        conn.execute("PRAGMA busy_timeout=10000")
        self._conn = conn
        return conn


def noop() -> None:
    """The work: nothing, so what is measured is the handing over."""


def build() -> FastAPI:
    """Backstop's app (its settings from the environment) plus the two bench endpoints."""
    app = create_app()

    @app.post("/bench/background", status_code=status.HTTP_202_ACCEPTED)
    def with_background_tasks(background: BackgroundTasks) -> dict[str, bool]:
        background.add_task(noop)
        return {"accepted": True}

    @app.post("/bench/durable", status_code=status.HTTP_202_ACCEPTED)
    def with_durable_tasks(tasks: DurableTasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(durable_noop)}

    @app.post("/bench/background-async", status_code=status.HTTP_202_ACCEPTED)
    async def with_background_tasks_async(background: BackgroundTasks) -> dict[str, bool]:
        background.add_task(noop)
        return {"accepted": True}

    @app.post("/bench/durable-async", status_code=status.HTTP_202_ACCEPTED)
    async def with_durable_tasks_async(tasks: DurableTasks) -> dict[str, str]:
        return {"task_id": await tasks.add_task_async(durable_noop)}

    reference = Reference()

    @app.post("/bench/reference", status_code=status.HTTP_202_ACCEPTED)
    def with_reference(request: Request) -> dict[str, str]:
        return {"task_id": reference.enqueue(request)}

    @app.post("/bench/reference-async", status_code=status.HTTP_202_ACCEPTED)
    async def with_reference_async(request: Request) -> dict[str, str]:
        # On the event loop, as the reference design runs in an `async def` endpoint.
        return {"task_id": reference.enqueue(request)}

    @app.get("/bench/threads")
    async def threads() -> dict[str, object]:
        """This process and its threads' names by native id, for `harness.thread_cpu`."""
        return {
            "pid": os.getpid(),
            "threads": {str(t.native_id): t.name for t in threading.enumerate()},
        }

    return app
