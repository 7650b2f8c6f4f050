"""Group commit: every enqueue is committed before its caller hears back, concurrent ones
share transactions, and a bad task in a group fails alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from store.commits import GroupEnqueue
from store.engine import Database
from store.errors import IdempotencyConflict, TaskNotFound
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

        with pytest.raises(sa.exc.SQLAlchemyError):
            group.enqueue(NewTask(name="t"), T)
        assert group.enqueue(NewTask(name="t"), T) is None
    finally:
        sa.event.remove(db.engine, "checkout", note_the_writers)

    assert len(writers) == 2
    assert _count(db) == 2
