"""`/schedules`: the periodic tasks and when they next run."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import Service
from app.api.schemas import ScheduleOut
from app.runner.periodic import read_schedules


def list_schedules(service: Service) -> list[ScheduleOut]:
    """List the periodic tasks by name, each with its next run and the last tick recorded."""
    with service.db.read() as conn:
        infos = read_schedules(conn, service.registry)
    return [ScheduleOut.model_validate(info, from_attributes=True) for info in infos]


def add_routes(router: APIRouter) -> None:
    """Add the `/schedules` route to `router`."""
    router.add_api_route("/schedules", list_schedules, methods=["GET"], tags=["schedules"])
