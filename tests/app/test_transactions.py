"""Enqueueing in the caller's own transaction: a `Session` or an `AsyncSession`, on SQLite
and on PostgreSQL, beside a table of the team's own in the same database.

A commit stores the team's row and the task; a rollback stores neither; the local runner is
woken only after the commit.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import registry as orm_registry
from sqlmodel import Field, Session, SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from app.api import handlers
from app.enqueue import TaskClient
from app.errors import InvalidArguments, SessionOnAnotherDatabase
from app.tasks.registry import registry
from store import migrate
from store import tasks as store_tasks
from store.engine import Database, temporary_database
from store.errors import IdempotencyConflict, WriteTimeout
from store.models import Task

T = TypeVar("T")


class TeamModel(SQLModel, registry=orm_registry()):
    """The team's own models: a metadata of their own, as in a service of theirs."""


class Order(TeamModel, table=True):
    """A table of the team's, in the same database as Backstop's."""

    __tablename__ = "team_order"

    id: int | None = Field(default=None, primary_key=True)
    item: str


ORDERS = TeamModel.metadata.tables["team_order"]


@dataclass
class Place:
    """A migrated database holding the team's table, and the URLs that reach it."""

    db: Database
    async_url: str
    wakes: list[int]
    tasks: TaskClient

    def orders(self) -> list[str]:
        with self.db.read() as conn:
            return list(conn.execute(sa.select(ORDERS.c.item)).scalars())

    def stored(self) -> list[Task]:
        with self.db.read() as conn:
            return store_tasks.list_tasks(conn, limit=100).items

    def run(self, session_work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`session_work` in a fresh `AsyncSession` on this database, on a loop of its own."""

        async def main() -> T:
            engine = create_async_engine(self.async_url)
            try:
                async with AsyncSession(engine) as session:
                    return await session_work(session)
            finally:
                await engine.dispose()

        return asyncio.run(main())


def _prepare(url: str, async_url: str) -> Iterator[Place]:
    db = Database.from_url(url)
    migrate.upgrade(db)
    TeamModel.metadata.create_all(db.engine)
    wakes: list[int] = []
    client = TaskClient(db, registry, wake=lambda: wakes.append(1))
    try:
        yield Place(db, async_url, wakes, client)
    finally:
        client.close()
        db.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Place]:
    """The test's own database, on SQLite and on PostgreSQL in turn."""
    if request.param == "sqlite":
        path = tmp_path / "backstop.db"
        yield from _prepare(f"sqlite:///{path}", f"sqlite+aiosqlite:///{path}")
        return
    server: str = request.getfixturevalue("server")
    with temporary_database(server, "backstop_tx") as url:
        # The same `postgresql+psycopg://` URL: SQLAlchemy picks psycopg's async mode.
        yield from _prepare(url, url)


# -- a Session --------------------------------------------------------------------------


def test_a_commit_stores_the_row_and_the_task_then_wakes_the_runner(place: Place) -> None:
    with Session(place.db.engine) as session:
        order = Order(item="book")
        session.add(order)
        session.flush()
        order_id = order.id
        task_id = place.tasks.add_task("test.echo", order_id, session=session)
        assert place.stored() == []
        assert place.wakes == []
        session.commit()

    assert place.wakes == [1]
    assert place.orders() == ["book"]
    [task] = place.stored()
    assert (task.id, task.name, task.args) == (task_id, "test.echo", [order_id])


def test_a_rollback_stores_neither_and_wakes_nothing(place: Place) -> None:
    with Session(place.db.engine) as session:
        order = Order(item="book")
        session.add(order)
        session.flush()
        place.tasks.add_task("test.echo", order.id, session=session)
        session.rollback()

    assert place.orders() == []
    assert place.stored() == []
    assert place.wakes == []


def test_an_id_not_yet_flushed_is_refused_with_the_advice_to_flush(place: Place) -> None:
    with Session(place.db.engine) as session:
        order = Order(item="book")
        session.add(order)
        with pytest.raises(InvalidArguments, match=r"session\.flush\(\)"):
            place.tasks.add_task("test.echo", order.id, session=session)
        session.commit()

    assert place.orders() == ["book"]
    assert place.stored() == []


def test_an_idempotency_key_in_a_session_stores_one_task_and_a_rollback_frees_it(
    place: Place,
) -> None:
    with Session(place.db.engine) as session:
        first = place.tasks.add_task("test.echo", 1, session=session, idempotency_key="k")
        again = place.tasks.add_task("test.echo", 1, session=session, idempotency_key="k")
        assert again == first
        with pytest.raises(IdempotencyConflict):
            place.tasks.add_task("test.echo", 2, session=session, idempotency_key="k")
        session.rollback()
    assert place.stored() == []

    with Session(place.db.engine) as session:
        kept = place.tasks.add_task("test.echo", 1, session=session, idempotency_key="k")
        session.commit()
    assert kept != first
    assert [task.id for task in place.stored()] == [kept]
    assert place.tasks.add_task("test.echo", 1, idempotency_key="k") == kept


def test_the_wake_waits_for_the_outer_commit_not_a_savepoint(place: Place) -> None:
    with Session(place.db.engine) as session:
        savepoint = session.begin_nested()
        place.tasks.add_task("test.echo", 1, session=session)
        savepoint.commit()
        assert place.wakes == []
        session.commit()
    assert place.wakes == [1]


# -- an AsyncSession --------------------------------------------------------------------


def test_an_async_commit_stores_the_row_and_the_task_then_wakes_the_runner(
    place: Place,
) -> None:
    async def work(session: AsyncSession) -> tuple[str, int | None]:
        order = Order(item="lamp")
        session.add(order)
        await session.flush()
        order_id = order.id
        task_id = await place.tasks.add_task_async("test.echo", order_id, session=session)
        assert place.stored() == []
        assert place.wakes == []
        await session.commit()
        return task_id, order_id

    task_id, order_id = place.run(work)

    assert place.wakes == [1]
    assert place.orders() == ["lamp"]
    [task] = place.stored()
    assert (task.id, task.args) == (task_id, [order_id])


def test_an_async_rollback_stores_neither_and_wakes_nothing(place: Place) -> None:
    async def work(session: AsyncSession) -> None:
        order = Order(item="lamp")
        session.add(order)
        await session.flush()
        await place.tasks.add_task_async("test.echo", order.id, session=session)
        await session.rollback()

    place.run(work)

    assert place.orders() == []
    assert place.stored() == []
    assert place.wakes == []


def test_submit_async_in_a_session_answers_the_task_and_whether_it_is_new(
    place: Place,
) -> None:
    async def work(session: AsyncSession) -> list[tuple[Task, bool]]:
        answers = [
            await place.tasks.submit_async(
                "test.echo", [7], session=session, idempotency_key="async-key"
            )
            for _ in range(2)
        ]
        await session.commit()
        return answers

    (first, created), (again, created_again) = place.run(work)

    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert [task.id for task in place.stored()] == [first.id]
    assert place.wakes == [1]


def test_an_async_id_not_yet_flushed_is_refused_with_the_advice_to_flush(
    place: Place,
) -> None:
    async def work(session: AsyncSession) -> None:
        order = Order(item="lamp")
        session.add(order)
        with pytest.raises(InvalidArguments, match=r"await session\.flush\(\)"):
            await place.tasks.add_task_async("test.echo", order.id, session=session)

    place.run(work)
    assert place.stored() == []


def test_a_session_of_the_other_kind_is_refused_with_the_right_call(place: Place) -> None:
    async def work(session: AsyncSession) -> None:
        with pytest.raises(TypeError, match="add_task_async"):
            place.tasks.add_task("test.echo", 1, session=session)  # type: ignore[arg-type]
        with Session(place.db.engine) as sync_session, pytest.raises(TypeError, match="add_task"):
            await place.tasks.add_task_async(
                "test.echo",
                1,
                session=sync_session,  # type: ignore[arg-type]
            )

    place.run(work)
    assert place.stored() == []


def test_a_session_on_another_database_is_refused_naming_both(place: Place, tmp_path: Path) -> None:
    other = Database.from_url(f"sqlite:///{tmp_path / 'other.db'}")
    migrate.upgrade(other)  # Backstop's tables are there too: the task would land unseen
    try:
        with Session(other.engine) as session:
            with pytest.raises(SessionOnAnotherDatabase, match=r"other\.db.*Backstop on"):
                place.tasks.add_task("test.echo", 1, session=session)
            session.rollback()

        async def work(session: AsyncSession) -> None:
            with pytest.raises(SessionOnAnotherDatabase):
                await place.tasks.add_task_async("test.echo", 1, session=session)

        async def main() -> None:
            engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
            try:
                async with AsyncSession(engine) as session:
                    await work(session)
            finally:
                await engine.dispose()

        asyncio.run(main())
        with other.read() as conn:
            assert store_tasks.list_tasks(conn, limit=10).items == []
    finally:
        other.dispose()
    assert place.stored() == []


# -- bounded by BACKSTOP_ENQUEUE_TIMEOUT while another process holds a lock ------------------

# Another process: takes a lock with its statements, says so, and holds it until its stdin
# closes (its connection then ends, and the lock with it).
_HOLDER = """
import sys
url, *statements = sys.argv[1:]
if url.startswith("sqlite:///"):
    import sqlite3
    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    statements = ["BEGIN IMMEDIATE"]
else:
    import psycopg
    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1))
for statement in statements:
    conn.execute(statement)
print("held", flush=True)
sys.stdin.read()
"""

# No INSERT into the task table gets past this lock.
_TABLE_LOCK = ("BEGIN", "LOCK TABLE task IN SHARE ROW EXCLUSIVE MODE")

# An insert of the holder's, not committed, with the idempotency key "k": an insert of the
# same key waits for the holder's transaction to end (a row lock, in effect).
_SAME_KEY = (
    "INSERT INTO task (id, name, status, queue, priority, args, kwargs, attempts,"
    " max_attempts, created_at, scheduled_at, idempotency_key, lease_token, expirations)"
    " VALUES ('held', 'test.echo', 'queued', 'default', 0, '[]', '{}', 0, 5, now(), now(),"
    " 'k', 0, 0)"
)


@contextmanager
def held(place: Place, *statements: str) -> Iterator[None]:
    """A lock held by another process for the time of the block (SQLite: the write lock,
    whatever `statements` say; PostgreSQL: what they take, in a transaction left open)."""
    url = place.db.engine.url.render_as_string(hide_password=False)
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, url, *statements],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdin is not None
        assert holder.stdout is not None
        try:
            assert holder.stdout.readline() == "held\n"
            yield
        finally:
            holder.stdin.close()
            assert holder.wait(timeout=30) == 0


def bounded_client(place: Place) -> TaskClient:
    """A client whose enqueues wait at most 0.2 s (`BACKSTOP_ENQUEUE_TIMEOUT`)."""
    return TaskClient(place.db, registry, timeout=0.2)


@pytest.mark.parametrize("lock", ["table", "same key"])
def test_an_enqueue_in_a_session_gives_up_at_the_timeout_and_leaves_the_session_usable(
    place: Place, lock: str
) -> None:
    tasks = bounded_client(place)
    try:
        statements = _TABLE_LOCK if lock == "table" else ("BEGIN", _SAME_KEY)
        with Session(place.db.engine) as session:
            with held(place, *statements):
                with pytest.raises(WriteTimeout, match=r"within 0\.2s"):
                    tasks.add_task("test.echo", 1, session=session, idempotency_key="k")
                # Still usable: the caller's own writes go on, without the task.
                session.add(Order(item="book"))
            session.commit()
    finally:
        tasks.close()

    assert place.orders() == ["book"]
    assert place.stored() == []


def test_an_enqueue_in_a_session_of_the_teams_own_engine_gives_up_at_the_timeout(
    place: Place,
) -> None:
    # The team's engine, not Backstop's: on SQLite its transaction begins DEFERRED and the
    # wait is the INSERT's, on the driver's own busy timeout (5 s), not a BEGIN's.
    engine = sa.create_engine(place.db.engine.url)
    tasks = bounded_client(place)
    try:
        with Session(engine) as session:
            assert session.exec(sa.select(ORDERS.c.item)).all() == []  # type: ignore[call-overload]
            with held(place, *_TABLE_LOCK), pytest.raises(WriteTimeout):
                tasks.add_task("test.echo", 1, session=session)
            # The lock gone, the same transaction enqueues and commits.
            task_id = tasks.add_task("test.echo", 2, session=session)
            session.commit()
    finally:
        tasks.close()
        engine.dispose()

    assert [(task.id, task.args) for task in place.stored()] == [(task_id, [2])]


def test_an_async_enqueue_in_a_session_gives_up_at_the_timeout(place: Place) -> None:
    tasks = bounded_client(place)

    async def work(session: AsyncSession) -> None:
        with held(place, *_TABLE_LOCK), pytest.raises(WriteTimeout):
            await tasks.add_task_async("test.echo", 1, session=session)
        await session.commit()

    try:
        place.run(work)
    finally:
        tasks.close()
    assert place.stored() == []


def test_a_bounded_enqueue_in_a_session_puts_the_lock_waits_back(place: Place) -> None:
    if place.db.dialect == "sqlite":
        show = "PRAGMA busy_timeout"
        setting = "PRAGMA busy_timeout = 1234"
    else:
        show = (
            "SELECT current_setting('lock_timeout') || ' ' || current_setting('statement_timeout')"
        )
        setting = "SET LOCAL lock_timeout = 1234"
    tasks = bounded_client(place)
    try:
        with Session(place.db.engine) as session:
            conn = session.connection()
            conn.exec_driver_sql(setting)
            before = conn.exec_driver_sql(show).one()
            tasks.add_task("test.echo", 1, session=session)
            assert conn.exec_driver_sql(show).one() == before
            session.commit()
    finally:
        tasks.close()
    assert len(place.stored()) == 1


def test_an_endpoint_whose_enqueue_in_a_session_times_out_answers_503_with_retry_after(
    place: Place,
) -> None:
    tasks = bounded_client(place)
    service = FastAPI()
    handlers.install(service)

    @service.post("/orders")
    def create_order() -> dict[str, str]:
        with Session(place.db.engine) as session:
            task_id = tasks.add_task("test.echo", 1, session=session)
            session.add(Order(item="book"))
            session.commit()
        return {"task_id": task_id}

    try:
        with held(place, *_TABLE_LOCK), TestClient(service) as http:
            answer = http.post("/orders")
    finally:
        tasks.close()

    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"]
    assert "did not take the write within 0.2s" in answer.json()["detail"]
    assert place.orders() == []
    assert place.stored() == []
