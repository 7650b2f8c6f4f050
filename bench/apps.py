"""The app the HTTP benchmarks serve: the same endpoint with FastAPI's BackgroundTasks and
with Backstop's DurableTasks, side by side in one app so both run on the same server.

    uvicorn --factory bench.apps:build
"""

from __future__ import annotations

from fastapi import BackgroundTasks, FastAPI, status

from app import DurableTasks
from app.main import create_app
from bench.tasks import noop as durable_noop


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

    return app
