"""Liveness (`/healthz`, the standalone service's) and readiness (`/readyz`, on the task API's
router, so it sits under the prefix a team mounts Backstop at)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from app.api.deps import Service
from app.api.schemas import answers
from store import migrate

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """200 while the process lives."""
    return {"status": "ok"}


async def readyz(service: Service) -> dict[str, str] | JSONResponse:
    """200 when the database answers and its schema is current, else 503."""
    try:
        current = await run_in_threadpool(migrate.is_current, service.db)
    except Exception as exc:
        return JSONResponse(
            {"detail": f"database unavailable: {type(exc).__name__}: {exc}"}, status_code=503
        )
    if not current:
        return JSONResponse({"detail": "database schema is not current"}, status_code=503)
    return {"status": "ready"}


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
