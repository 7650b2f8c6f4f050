"""Liveness (`/healthz`, the standalone service's) and readiness (`/readyz`, on the task API's
router, so it sits under the prefix a team mounts Backstop at)."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api.deps import Service
from app.api.schemas import answers
from app.backstop import Backstop
from store import migrate
from store.errors import DatabaseFileGone
from store.health import as_unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


async def readyz(service: Service) -> dict[str, str] | JSONResponse:
    """200 when the database answers, takes writes, and its schema is current; else 503."""
    try:
        problem = await run_in_threadpool(_write_problem, service)
        # Not read when writes fail: a new connection to a deleted file would create another.
        current = problem is None and await run_in_threadpool(migrate.is_current, service.db)
    except Exception as exc:
        return JSONResponse(
            {"detail": f"database unavailable: {type(exc).__name__}: {exc}"}, status_code=503
        )
    if problem is not None:
        return JSONResponse({"detail": f"database not ready: {problem}"}, status_code=503)
    if not current:
        return JSONResponse({"detail": "database schema is not current"}, status_code=503)
    return {"status": "ready"}


def _write_problem(service: Backstop) -> str | None:
    """Why writes fail now, or None.

    Every write of the process reports to `db.health`, so while the latest one succeeded
    there is nothing to try: a poll costs no write and never waits for the lock. After a
    failure, one write that changes nothing tells whether it is over, so that the answer
    turns back to 200 by itself, even when no request comes to write. A file deleted or
    replaced stays a problem until the process restarts.
    """
    health = service.db.health
    if health.file is not None:
        with contextlib.suppress(DatabaseFileGone):
            health.file.check()
    if health.problem is None:
        return None
    try:
        with service.db.write(wait=service.settings.enqueue_timeout) as conn:
            migrate.touch_version(conn)
    except Exception as exc:
        if as_unavailable(exc) is None:
            raise
    return health.problem


def add_routes(router: APIRouter) -> None:
    """Add `/readyz` to `router`."""
    router.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        tags=["health"],
        response_model=dict[str, str],
        responses=answers(503),
    )
