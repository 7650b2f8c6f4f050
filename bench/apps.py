"""The apps the benchmarks serve: the same endpoint with FastAPI's BackgroundTasks and with
Backstop's DurableTasks, side by side in one app so both run on the same server setup."""

from __future__ import annotations

from fastapi import BackgroundTasks, FastAPI, status

from app import DurableTasks, task
from app.main import create_app


def noop() -> None:
    """The work: nothing, so what is measured is the handing over."""


@task(name="bench.noop")
def durable_noop() -> None:
    """The same nothing, as a durable task."""


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

    return app
