"""FastAPI dependencies, as `Annotated` aliases so route signatures read like sentences."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.client import TaskClient
from app.service import Backstop


def get_backstop(request: Request) -> Backstop:
    """The Backstop instance of the app serving this request."""
    backstop: Backstop = request.app.state.backstop
    return backstop


def get_tasks(request: Request) -> TaskClient:
    """The task client: `tasks.add_task(fn, *args)` commits before the endpoint returns."""
    return get_backstop(request).tasks


Service = Annotated[Backstop, Depends(get_backstop)]
DurableTasks = Annotated[TaskClient, Depends(get_tasks)]
