"""Rate-limited claims: never more starts than the limit in any window, counted by the
database, whichever claimer asks; and nothing of the sort for the other queues."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from store.engine import Database
from store.leases import claim_due
from store.models import queue_start_table
from store.outcomes import schedule_retry
from store.ratelimits import LimitedClaim, RateLimit, claim_limited, queue_use
from store.tasks import NewTask, enqueue_many

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0
THREE_IN_10S = RateLimit(3, timedelta(seconds=10))


def _enqueue(db: Database, count: int, queue: str = "email") -> None:
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t", queue=queue) for _ in range(count)], now=T)


def _claim(
    db: Database, limit: int, at: datetime, rate: RateLimit = THREE_IN_10S, owner: str = "w1"
) -> LimitedClaim:
    with db.write() as conn:
        return claim_limited(
            conn, owner, limit, queue="email", rate=rate, lease_seconds=LEASE, now=at
        )


def test_a_claim_takes_no_more_than_the_allowance_and_says_when_it_reopens(db: Database) -> None:
    _enqueue(db, 10)
    first = _claim(db, 2, T)
    assert len(first.claims) == 2
    assert first.reopens_at is None  # one start is still allowed
    second = _claim(db, 5, T + timedelta(seconds=4))
    assert len(second.claims) == 1
    assert second.reopens_at == T + timedelta(seconds=10)  # when the first two leave the window
    refused = _claim(db, 5, T + timedelta(seconds=9))
    assert refused.claims == []
    assert refused.reopens_at == T + timedelta(seconds=10)


def test_the_window_slides_start_by_start(db: Database) -> None:
    _enqueue(db, 10)
    _claim(db, 2, T)
    _claim(db, 1, T + timedelta(seconds=4))
    # The two starts at T leave the window at T+10 s exactly; the one at T+4 s stays.
    assert _claim(db, 5, T + timedelta(seconds=9, microseconds=999_999)).claims == []
    reopened = _claim(db, 5, T + timedelta(seconds=10))
    assert len(reopened.claims) == 2
    assert reopened.reopens_at == T + timedelta(seconds=14)
    later = _claim(db, 5, T + timedelta(seconds=14))
    assert len(later.claims) == 1
    assert later.reopens_at == T + timedelta(seconds=20)


def test_retries_count_as_starts(db: Database) -> None:
    _enqueue(db, 1)
    rate = RateLimit(2, timedelta(seconds=10))
    [claim] = _claim(db, 1, T, rate).claims
    with db.write() as conn:
        schedule_retry(conn, claim.lease, "boom", None, T, now=T)
    [again] = _claim(db, 1, T + timedelta(seconds=1), rate).claims
    assert (again.id, again.attempts) == (claim.id, 2)
    _enqueue(db, 1)
    refused = _claim(db, 1, T + timedelta(seconds=2), rate)
    assert refused.claims == []
    assert refused.reopens_at == T + timedelta(seconds=10)


def test_old_starts_are_pruned_by_the_claim(db: Database) -> None:
    _enqueue(db, 6)
    _claim(db, 3, T)
    _claim(db, 3, T + timedelta(seconds=30))
    with db.read() as conn:
        kept = conn.execute(sa.select(queue_start_table.c.started_at)).scalars().all()
    assert kept == [T + timedelta(seconds=30)] * 3


def test_other_queues_are_neither_limited_nor_counted(db: Database) -> None:
    _enqueue(db, 5)
    _enqueue(db, 5, queue="default")
    assert len(_claim(db, 5, T).claims) == 3
    with db.write() as conn:
        others = claim_due(conn, "w1", 10, lease_seconds=LEASE, queue="default", now=T)
    assert {claim.queue for claim in others} == {"default"}
    assert len(others) == 5
    with db.read() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(queue_start_table)).scalar()
    assert rows == 3  # the unlimited claim wrote no start


def test_the_claim_of_any_queue_leaves_the_excluded_ones(db: Database) -> None:
    _enqueue(db, 5)  # older, so first in line were they not excluded
    _enqueue(db, 2, queue="default")
    _enqueue(db, 2, queue="sms")
    with db.write() as conn:
        claims = claim_due(conn, "w1", 10, lease_seconds=LEASE, exclude=["email", "sms"], now=T)
    assert [claim.queue for claim in claims] == ["default", "default"]


def test_queue_use_shows_the_window(db: Database) -> None:
    _enqueue(db, 5)
    limits = {"email": THREE_IN_10S, "sms": RateLimit(1, timedelta(minutes=1))}
    _claim(db, 3, T)
    with db.read() as conn:
        use = queue_use(conn, limits, T + timedelta(seconds=1))
        later = queue_use(conn, limits, T + timedelta(seconds=10))
    assert (use["email"].started, use["email"].reopens_at) == (3, T + timedelta(seconds=10))
    assert (use["sms"].started, use["sms"].reopens_at) == (0, None)
    assert (later["email"].started, later["email"].reopens_at) == (0, None)


def test_racing_claimers_never_exceed_the_limit(db: Database) -> None:
    """Four threads claim at the same instant, round after round: each round the window
    admits exactly the limit between them. (On PostgreSQL, without the queue's lock, every
    one would count the same starts under READ COMMITTED and take the whole allowance.)"""
    _enqueue(db, 200)
    rate = RateLimit(5, timedelta(seconds=1))
    rounds = 6
    meet = threading.Barrier(4)
    taken: dict[int, list[int]] = {n: [] for n in range(rounds)}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(owner: str) -> None:
        try:
            for n in range(rounds):
                meet.wait(timeout=20)
                got = _claim(db, 3, T + n * rate.period, rate, owner)
                with lock:
                    taken[n].append(len(got.claims))
        except BaseException as error:
            errors.append(error)
            meet.abort()

    threads = [threading.Thread(target=run, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert [sum(counts) for counts in taken.values()] == [rate.starts] * rounds


def test_an_idle_limited_queue_is_neither_locked_nor_counted(db: Database) -> None:
    """Nothing of the queue due: one probe and nothing else, so the claim never waits for
    another runner's lock on the queue (PostgreSQL holds it to the end of a transaction)."""
    _enqueue(db, 2, queue="default")
    with db.write() as conn:
        enqueue_many(
            conn, [NewTask(name="t", queue="email", scheduled_at=T + timedelta(hours=1))], now=T
        )
    statements: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", capture)
    try:
        idle = _claim(db, 5, T)
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", capture)
    assert idle == LimitedClaim([], None)
    assert len([s for s in statements if "FROM task" in s]) == 1
    assert not [s for s in statements if "queue_start" in s or "advisory" in s]


def test_a_start_that_no_window_can_hold_blocks_no_queue(db: Database) -> None:
    """A start later than a period from now (written by hand, by a clock far off, or on
    SQLite a value that is not a time, which compares as text after every time) would fill
    every window and never leave one: the claim prunes it with the old ones."""
    _enqueue(db, 3)
    with db.write() as conn:
        conn.execute(
            sa.insert(queue_start_table),
            [{"queue": "email", "started_at": T + timedelta(days=400)}] * 3,
        )
        if conn.dialect.name == "sqlite":
            conn.execute(
                sa.text("INSERT INTO queue_start (queue, started_at) VALUES ('email', 'junk')")
            )
    with db.read() as conn:
        assert queue_use(conn, {"email": THREE_IN_10S}, T)["email"].started == 0
    assert len(_claim(db, 5, T).claims) == 3
    with db.read() as conn:
        kept = conn.execute(sa.select(sa.func.count()).select_from(queue_start_table)).scalar()
    assert kept == 3  # the claim's own starts
