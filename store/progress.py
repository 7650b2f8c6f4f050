"""How far a running attempt got: written under the attempt's lease, read with the task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.changes import notify_changed
from store.models import Lease, TaskStatus, task_table

t = task_table

_RECORD = (
    sa.update(t)
    .where(
        t.c.id == sa.bindparam("p_id"),
        t.c.lease_token == sa.bindparam("p_token"),
        t.c.status == TaskStatus.RUNNING,
    )
    .values(progress=sa.bindparam("p_progress", type_=t.c.progress.type))
)


def record_progress(conn: Connection, reports: Sequence[tuple[Lease, dict[str, Any]]]) -> int:
    """Store each running task's latest progress, in one statement; a report whose lease is
    no longer held (the attempt ended, or another runner took the task) changes nothing.
    Returns how many tasks were written."""
    if not reports:
        return 0
    result = conn.execute(
        _RECORD,
        [
            {"p_id": lease.task_id, "p_token": lease.token, "p_progress": progress}
            for lease, progress in reports
        ],
    )
    notify_changed(conn, [lease.task_id for lease, _ in reports])
    return result.rowcount
