"""The FastAPI application: the task API mounted and the runner in its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app import logs
from app.api import demo, handlers, health, schedules, tasks
from app.api.middleware import BearerToken, BodyLimit
from app.backstop import Backstop
from app.settings import Settings


def create_app(settings: Settings | None = None, *, run_worker: bool | None = None) -> FastAPI:
    """Build the app on `settings` (the environment's by default).

    At start-up the schema is upgraded and, unless `run_worker` (or `BACKSTOP_RUN_WORKER`)
    says otherwise, the runner starts; at shutdown the runner stops gracefully.
    """
    settings = settings or Settings()
    backstop = Backstop(settings)
    with_runner = settings.run_worker if run_worker is None else run_worker

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Here, not at import: the server has configured logging (or not) by now.
        logs.configure(settings)
        await run_in_threadpool(backstop.prepare)
        if with_runner:
            await backstop.runner.start()
        try:
            with backstop.serving():
                yield
        finally:
            if with_runner:
                await backstop.runner.stop()
            backstop.close()

    app = FastAPI(
        title="Backstop",
        summary="Durable background tasks on a SQLite file.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.backstop = backstop
    handlers.install(app)
    app.include_router(tasks.router)
    app.include_router(schedules.router)
    app.include_router(health.router)
    app.include_router(demo.router)
    # The last added runs first: the token is checked before the body is read at all.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_token:
        app.add_middleware(BearerToken, token=settings.api_token)
    return app


app = create_app()
