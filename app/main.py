"""The standalone service: the task API at the root, `/healthz`, the demo route, and the
runner in the app's lifespan. `backstop serve` runs `app.main:app`."""

from __future__ import annotations

from fastapi import FastAPI

from app.api import demo, handlers, health
from app.api.middleware import BearerToken
from app.api.router import guarded_router
from app.backstop import Backstop
from app.settings import Settings


def create_app(settings: Settings | None = None, *, run_worker: bool | None = None) -> FastAPI:
    """Build the standalone app on `settings` (the environment's by default).

    At start-up the schema is upgraded and, unless `run_worker` (or `BACKSTOP_RUN_WORKER`)
    says otherwise, the runner starts; at shutdown the runner stops gracefully.
    """
    settings = settings or Settings()
    if run_worker is not None:
        settings = settings.model_copy(update={"run_worker": run_worker})
    backstop = Backstop(settings)
    backstop.freeze_heap = True  # the process is Backstop's own
    app = FastAPI(
        title="Backstop",
        summary="Durable background tasks on a SQLite file.",
        version="0.1.0",
        lifespan=backstop.lifespan,
    )
    app.state.backstop = backstop
    handlers.install(app)
    app.include_router(backstop.router)
    app.include_router(health.router)
    examples = guarded_router(backstop)
    demo.add_routes(examples)
    app.include_router(examples)
    if settings.api_token.get_secret_value():
        # The task API checks the token itself; this locks the rest (demo, /docs) as well.
        app.add_middleware(
            BearerToken, token=settings.api_token, discard=settings.max_discard_bytes
        )
    return app


app = create_app()
