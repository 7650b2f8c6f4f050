"""Periodic tasks' progress: the last tick each schedule enqueued, shared by all processes."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.models import Schedule, schedule_table
from store.timeutil import utcnow

s = schedule_table


def get_schedules(conn: Connection) -> dict[str, Schedule]:
    """Every schedule's state, by name."""
    rows = conn.execute(sa.select(s))
    return {row.name: Schedule.model_validate(row._mapping) for row in rows}


def advance_schedule(
    conn: Connection, name: str, tick: datetime, *, now: datetime | None = None
) -> bool:
    """Record `tick` as the schedule's last; False (nothing written) if it already got there.

    Run it in the transaction that enqueues the tick's task, so the two stand or fall together.
    """
    now = now or utcnow()
    moved = conn.execute(
        sa.update(s)
        .where(s.c.name == name, sa.or_(s.c.last_tick.is_(None), s.c.last_tick < tick))
        .values(last_tick=tick, updated_at=now)
    ).rowcount
    if moved:
        return True
    exists = conn.execute(sa.select(s.c.name).where(s.c.name == name)).first()
    if exists is not None:
        return False
    conn.execute(sa.insert(s).values(name=name, last_tick=tick, updated_at=now))
    return True
