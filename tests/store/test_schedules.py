"""The schedules' shared progress: each one's last tick only ever moves forward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from store.engine import Database
from store.schedules import advance_schedule, get_schedules

T = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def test_advancing_an_unknown_schedule_records_it(db: Database) -> None:
    with db.write() as conn:
        assert advance_schedule(conn, "reports", T, now=T + timedelta(seconds=2))

    with db.read() as conn:
        [(name, schedule)] = get_schedules(conn).items()
    assert (name, schedule.last_tick, schedule.updated_at) == (
        "reports",
        T,
        T + timedelta(seconds=2),
    )


def test_a_schedule_only_moves_forward(db: Database) -> None:
    with db.write() as conn:
        advance_schedule(conn, "reports", T)
        assert advance_schedule(conn, "reports", T + timedelta(minutes=5))
        assert not advance_schedule(conn, "reports", T + timedelta(minutes=5))
        assert not advance_schedule(conn, "reports", T)
        advance_schedule(conn, "other", T)

    with db.read() as conn:
        ticks = {name: s.last_tick for name, s in get_schedules(conn).items()}
    assert ticks == {"reports": T + timedelta(minutes=5), "other": T}
