"""FastAPI dependencies, as `Annotated` aliases so route signatures read like sentences.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in
its thread pool, a hand-over to another thread and back on every request, for what is an
attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.backstop import Backstop
from app.enqueue import TaskClient


async def get_backstop(request: Request) -> Backstop:
    """The Backstop serving this request: the one whose router the route belongs to, or, in
    the app's own endpoints, the one whose lifespan the app entered."""
    backstop = getattr(request.state, "backstop", None)
    if isinstance(backstop, Backstop):
        return backstop
    return Backstop.of(request.app)


async def get_tasks(request: Request) -> TaskClient:
    """The task client: `tasks.add_task(fn, *args)` commits before the endpoint returns."""
    return (await get_backstop(request)).tasks


Service = Annotated[Backstop, Depends(get_backstop)]
DurableTasks = Annotated[TaskClient, Depends(get_tasks)]
