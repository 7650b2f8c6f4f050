"""The attempt history of a task."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.errors import TaskNotFound
from store.models import Attempt, attempt_table, task_table

a = attempt_table


def list_attempts(conn: Connection, task_id: str) -> list[Attempt]:
    """Every attempt at a task, oldest first; `TaskNotFound` when the task does not exist."""
    exists = conn.execute(sa.select(task_table.c.id).where(task_table.c.id == task_id)).first()
    if exists is None:
        raise TaskNotFound(task_id)
    rows = conn.execute(sa.select(a).where(a.c.task_id == task_id).order_by(a.c.id))
    return [Attempt.model_validate(row._mapping) for row in rows]
