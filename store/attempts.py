"""The attempt history of a task."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.errors import TaskNotFound
from store.models import Attempt, AttemptOutcome, attempt_table, task_table

a = attempt_table
t = task_table


def of_task(task_id: Any) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    """Where an attempt is one of the task `task_id`'s (a value or a bind parameter).

    Attempts are indexed by their task's creation time first (see `Attempt`), so the test
    names it, read from the task's row, for the index to serve it.
    """
    created = sa.select(t.c.created_at).where(t.c.id == task_id).scalar_subquery()
    return a.c.task_created_at == created, a.c.task_id == task_id


def list_attempts(conn: Connection, task_id: str) -> list[Attempt]:
    """Every attempt at a task, oldest first; `TaskNotFound` when the task does not exist."""
    if conn.execute(sa.select(t.c.id).where(t.c.id == task_id)).first() is None:
        raise TaskNotFound(task_id)
    # The creation time as a subquery, not read and sent back: a value written by hand that
    # is not a time is compared as stored (see `store.timeutil.UnreadableTime`).
    rows = conn.execute(sa.select(a).where(*of_task(task_id)).order_by(a.c.id))
    return [_attempt(dict(row._mapping)) for row in rows]


def _attempt(values: dict[str, Any]) -> Attempt:
    # Built without validation, as `store.tasks` builds tasks: a row written by hand with an
    # outcome outside the enum keeps the stored text, which `AttemptOut` shows as unreadable.
    values["outcome"] = _OUTCOMES.get(values["outcome"], values["outcome"])
    return Attempt.model_construct(**values)


_OUTCOMES = {outcome.value: outcome for outcome in AttemptOutcome}
