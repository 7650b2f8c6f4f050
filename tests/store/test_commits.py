"""Group commit: every enqueue is committed before its caller hears back, concurrent ones
share transactions, and a bad task in a group fails alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from store import commits as commits_module
from store.commits import GroupEnqueue
from store.engine import Database, KeptConnection
from store.errors import IdempotencyConflict, TaskNotFound, WriteTimeout
from store.models import Task
from store.tasks import NewTask, count_by_status, get_task, stored_task

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def group(db: Database) -> Iterator[GroupEnqueue]:
    enqueuer = GroupEnqueue(db)
    yield enqueuer
    enqueuer.close()


@pytest.fixture
def other_db(db: Database) -> Iterator[Database]:
    """A second engine on the same file: it sees only what was committed."""
    database = Database(sa.create_engine(db.engine.url))
    yield database
    database.dispose()


@pytest.fixture
def commits(db: Database) -> Iterator[list[int]]:
    """One entry per transaction committed on the test's database."""
    seen: list[int] = []

    def count(_conn: object) -> None:
        seen.append(1)

    sa.event.listen(db.engine, "commit", count)
    yield seen
    sa.event.remove(db.engine, "commit", count)


def _stored(db: Database, task_id: str) -> Task | None:
    with db.read() as conn:
        try:
            return get_task(conn, task_id)
        except TaskNotFound:
            return None


def _count(db: Database) -> int:
    with db.read() as conn:
        return sum(count_by_status(conn).values())


def test_enqueue_returns_once_the_task_is_committed(
    group: GroupEnqueue, other_db: Database
) -> None:
    new = NewTask(name="t", args=[1])

    assert group.enqueue(new, T) is None
    assert _stored(other_db, new.id) == stored_task(new, T)


def test_concurrent_threads_each_get_their_own_task_committed(
    group: GroupEnqueue, other_db: Database
) -> None:
    news = [[NewTask(name="t", args=[n, i]) for i in range(5)] for n in range(16)]
    answers: list[Task | None] = []
    start = threading.Barrier(len(news))

    def enqueue_all(mine: list[NewTask]) -> None:
        start.wait()
        for new in mine:
            answers.append(group.enqueue(new, T))
            assert _stored(other_db, new.id) is not None  # committed before it returned

    threads = [threading.Thread(target=enqueue_all, args=(mine,)) for mine in news]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert answers == [None] * 80
    assert _count(other_db) == 80


def test_one_turn_of_an_event_loop_commits_in_one_transaction(
    group: GroupEnqueue, other_db: Database, commits: list[int]
) -> None:
    news = [NewTask(name="t", args=[n]) for n in range(20)]

    async def enqueue_all() -> list[Task | None]:
        return await asyncio.gather(*(group.enqueue_async(new, T) for new in news))

    assert asyncio.run(enqueue_all()) == [None] * 20
    assert len(commits) == 1
    assert all(_stored(other_db, new.id) is not None for new in news)


def test_a_bad_task_in_a_group_fails_alone(group: GroupEnqueue, db: Database) -> None:
    good = [NewTask(name="t", args=[n]) for n in range(3)]
    bad = NewTask(name="t", max_attempts=0)  # breaks ck_task_max_attempts

    async def enqueue_all() -> list[Task | BaseException | None]:
        calls = [group.enqueue_async(new, T) for new in (good[0], bad, *good[1:])]
        return await asyncio.gather(*calls, return_exceptions=True)

    first, failed, *rest = asyncio.run(enqueue_all())

    assert [first, *rest] == [None, None, None]
    assert isinstance(failed, IntegrityError)
    assert "ck_task_max_attempts" in str(failed)
    assert all(_stored(db, new.id) is not None for new in good)
    assert _stored(db, bad.id) is None


def test_keys_in_one_group_store_one_task_per_key(group: GroupEnqueue, db: Database) -> None:
    first = NewTask(name="t", idempotency_key="k", request_hash="same")
    replay = NewTask(name="t", idempotency_key="k", request_hash="same")
    other_body = NewTask(name="t", idempotency_key="k", request_hash="other")
    plain = NewTask(name="t")

    async def enqueue_all() -> list[Task | BaseException | None]:
        calls = [group.enqueue_async(new, T) for new in (first, plain, replay, other_body)]
        return await asyncio.gather(*calls, return_exceptions=True)

    stored, stored_plain, existing, conflict = asyncio.run(enqueue_all())

    assert (stored, stored_plain) == (None, None)
    assert existing == stored_task(first, T)
    assert isinstance(conflict, IdempotencyConflict)
    assert _count(db) == 2


def test_a_held_unique_key_in_the_middle_of_a_group_keeps_the_other_jobs(
    group: GroupEnqueue, db: Database, commits: list[int]
) -> None:
    holder = NewTask(name="t", unique_key="held")
    assert group.enqueue(holder, T) is None
    before = len(commits)
    plain = [NewTask(name="t", args=[n]) for n in range(3)]
    taken = NewTask(name="other", args=["x"], unique_key="held")
    fresh, fresh_again = NewTask(name="t", unique_key="new"), NewTask(name="t", unique_key="new")

    async def enqueue_all() -> list[Task | None]:
        jobs = (plain[0], fresh, taken, plain[1], fresh_again, plain[2])
        return await asyncio.gather(*(group.enqueue_async(new, T) for new in jobs))

    answers = asyncio.run(enqueue_all())

    # One transaction for the whole group: neither conflict made it fail and go one by one.
    assert len(commits) == before + 1
    assert answers == [None, None, stored_task(holder, T), None, stored_task(fresh, T), None]
    assert all(_stored(db, new.id) is not None for new in (*plain, fresh))
    assert _stored(db, taken.id) is None
    assert _stored(db, fresh_again.id) is None
    assert _count(db) == 5


def test_threads_and_event_loops_share_the_writer(group: GroupEnqueue, other_db: Database) -> None:
    from_thread = NewTask(name="t", args=["thread"])
    from_loop = NewTask(name="t", args=["loop"])
    answers: list[Task | None] = []
    thread = threading.Thread(target=lambda: answers.append(group.enqueue(from_thread, T)))
    thread.start()
    answers.append(asyncio.run(group.enqueue_async(from_loop, T)))
    thread.join()

    assert answers == [None, None]
    assert _count(other_db) == 2


def test_after_close_a_later_enqueue_starts_another_writer(
    group: GroupEnqueue, other_db: Database
) -> None:
    assert asyncio.run(group.enqueue_async(NewTask(name="t"), T)) is None
    group.close()
    group.close()  # a second close has nothing to stop

    assert group.enqueue(NewTask(name="t"), T) is None
    assert _count(other_db) == 2


def test_after_a_broken_connection_the_writer_opens_another(
    group: GroupEnqueue, db: Database
) -> None:
    writers: list[Any] = []

    def note_the_writers(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if threading.current_thread().name == "backstop-enqueue":
            writers.append(dbapi_connection)

    sa.event.listen(db.engine, "checkout", note_the_writers)
    try:
        assert group.enqueue(NewTask(name="t"), T) is None
        writers[0].close()  # the kept connection breaks under the writer

        if db.dialect == "postgresql":
            # A connection the server ended (a restart, a terminated backend): the group is
            # written once more, on a new connection, and its caller sees nothing.
            assert group.enqueue(NewTask(name="t"), T) is None
        else:  # a closed SQLite connection is not a lost one: the caller sees the error
            with pytest.raises(sa.exc.SQLAlchemyError):
                group.enqueue(NewTask(name="t"), T)
        assert group.enqueue(NewTask(name="t"), T) is None
    finally:
        sa.event.remove(db.engine, "checkout", note_the_writers)

    assert len(writers) == 2
    assert _count(db) == (3 if db.dialect == "postgresql" else 2)


# -- a write that cannot be made in time -------------------------------------------------


@pytest.fixture
def quick_db(db: Database) -> Iterator[Database]:
    """The test's database on an engine that waits 100 ms for SQLite's write lock."""
    database = Database.from_url(db.engine.url.render_as_string(), busy_timeout_ms=100)
    yield database
    database.dispose()


@pytest.fixture
def held_lock(db: Database) -> Iterator[Any]:
    """Another connection, as another process would, keeps the enqueue from writing until it
    rolls back or closes: SQLite's write lock, or a lock on PostgreSQL's task table."""
    if db.dialect == "postgresql":
        import psycopg

        url = db.engine.url.set(drivername="postgresql")
        holder: Any = psycopg.connect(url.render_as_string(hide_password=False))
        holder.execute("LOCK TABLE task IN SHARE ROW EXCLUSIVE MODE")  # no INSERT gets past
    else:
        holder = sqlite3.connect(str(db.engine.url.database), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    yield holder
    holder.close()


def test_a_write_past_its_timeout_is_withdrawn_and_never_committed(
    db: Database, held_lock: Any
) -> None:
    """The writer waits for the lock with the task in its group: the caller gives up, and
    when the lock frees the writer leaves the task out."""
    group = GroupEnqueue(db, timeout=0.1)
    new = NewTask(name="t")
    try:
        with pytest.raises(WriteTimeout, match=r"within 0\.1s"):
            group.enqueue(new, T)
        held_lock.rollback()
        assert group.enqueue(NewTask(name="t"), T) is None  # the writer got past it
    finally:
        group.close()

    assert _stored(db, new.id) is None
    assert _count(db) == 1


def test_a_task_withdrawn_while_its_group_ran_its_statements_is_rolled_back(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller withdraws after the INSERT, before the COMMIT: the group is rolled back
    and committed again without it; its neighbour is stored. (The race, staged: the
    writer is held after its statements until the withdrawal is in.)"""
    group = GroupEnqueue(db)
    late = commits_module._Job(NewTask(name="t"), T)
    neighbour = commits_module._Job(NewTask(name="t"), T)
    inserted, withdrawn = threading.Event(), threading.Event()
    real_insert = commits_module._insert

    def held_insert(conn: Any, jobs: list[Any]) -> Any:
        stored = real_insert(conn, jobs)
        if late in jobs:
            inserted.set()
            assert withdrawn.wait(10)
        return stored

    monkeypatch.setattr(commits_module, "_insert", held_insert)
    try:
        group._submit([late, neighbour])
        assert inserted.wait(10)
        assert group._withdraw(late)
        withdrawn.set()
        assert neighbour.done is not None
        assert neighbour.done.acquire(timeout=10)
    finally:
        group.close()

    assert neighbour.outcome() is None
    assert _stored(db, late.new.id) is None
    assert _stored(db, neighbour.new.id) is not None


def test_a_task_whose_commit_began_before_its_deadline_waits_for_it(db: Database) -> None:
    """Past the mark the writer puts on a group just before COMMIT, the caller cannot
    withdraw: it waits for the commit's outcome and hears the truth."""
    group = GroupEnqueue(db, timeout=0.1)
    new = NewTask(name="t")
    release = threading.Event()

    def slow_commit(_conn: object) -> None:
        if threading.current_thread().name == "backstop-enqueue":
            assert release.wait(10)

    sa.event.listen(db.engine, "commit", slow_commit)
    timer = threading.Timer(0.5, release.set)  # well past the caller's deadline
    timer.start()
    try:
        assert group.enqueue(new, T) is None
    finally:
        sa.event.remove(db.engine, "commit", slow_commit)
        timer.cancel()
        group.close()

    assert _stored(db, new.id) is not None


@pytest.mark.sqlite_only(
    reason="SQLite's busy timeout gives up on the lock; PostgreSQL's inserts wait on it"
)
def test_a_group_the_locked_database_refuses_fails_whole_not_one_task_at_a_time(
    quick_db: Database, held_lock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each task alone would only wait out the same lock again."""
    group = GroupEnqueue(quick_db)
    transactions: list[int] = []
    real_write = KeptConnection.write

    def counted(self: KeptConnection) -> Any:
        transactions.append(1)
        return real_write(self)

    monkeypatch.setattr(KeptConnection, "write", counted)
    news = [NewTask(name="t", args=[n]) for n in range(5)]

    async def enqueue_all() -> list[Task | BaseException | None]:
        return await asyncio.gather(
            *(group.enqueue_async(new, T) for new in news), return_exceptions=True
        )

    try:
        answers = asyncio.run(enqueue_all())
    finally:
        group.close()

    assert all(isinstance(answer, sa.exc.OperationalError) for answer in answers), answers
    assert len(transactions) == 1
    assert quick_db.health.problem is not None
    assert "locked" in quick_db.health.problem


def test_a_cancelled_caller_withdraws_its_task(db: Database, held_lock: Any) -> None:
    """A request whose client went away is not committed later."""
    group = GroupEnqueue(db)
    new = NewTask(name="t")

    async def give_up() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(group.enqueue_async(new, T), 0.1)

    try:
        asyncio.run(give_up())
        held_lock.rollback()
        assert group.enqueue(NewTask(name="t"), T) is None
    finally:
        group.close()

    assert _stored(db, new.id) is None
