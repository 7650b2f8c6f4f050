"""Backstop: durable background tasks for FastAPI services.

from app import Backstop, DurableTasks, TaskContext, task
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.api.deps import DurableTasks
    from app.backstop import Backstop
    from app.tasks.context import TaskContext
    from app.tasks.registry import task

__all__ = ["Backstop", "DurableTasks", "TaskContext", "task"]

# Each name is imported when it is first asked for, not with the package: the test kit's
# plugin (`app.testing`) loads in every pytest session of a venv that has Backstop, and
# importing it imports this package first. A session that never uses Backstop should not
# pay for FastAPI, SQLAlchemy and the runner.
_HOMES = {
    "Backstop": "app.backstop",
    "DurableTasks": "app.api.deps",
    "TaskContext": "app.tasks.context",
    "task": "app.tasks.registry",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'app' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # asked once: later lookups find it without this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
