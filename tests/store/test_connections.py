"""How Backstop connects to PostgreSQL: the pool, the timeouts, and a connection the server
ended while it sat idle."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from store import engine as store_engine
from store.changes import Listener
from store.commits import GroupEnqueue
from store.engine import Database, PostgresOptions, connect_args, create_engine, temporary_database
from store.tasks import NewTask
from tests.support.projects import free_port

NOW = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture
def database_url(server: str) -> Iterator[str]:
    """A PostgreSQL database of the test's own (empty: no schema)."""
    with temporary_database(server, "backstop_conn") as url:
        yield url


def test_the_pool_has_the_size_and_overflow_asked_for(database_url: str) -> None:
    engine = create_engine(database_url, postgres=PostgresOptions(pool_size=3, max_overflow=2))
    try:
        pool = engine.pool
        assert isinstance(pool, sa.QueuePool)
        assert (pool.size(), pool._max_overflow) == (3, 2)
    finally:
        engine.dispose()


def test_a_statement_over_the_timeout_is_cancelled_by_the_server(database_url: str) -> None:
    engine = create_engine(database_url, postgres=PostgresOptions(statement_timeout=0.2))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "200ms"
            with pytest.raises(sa.exc.OperationalError, match="statement timeout"):
                conn.exec_driver_sql("SELECT pg_sleep(5)")
    finally:
        engine.dispose()


def test_no_timeout_unless_asked_and_link_checks_always(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "0"
        args = connect_args(engine)
        assert args["connect_timeout"] == 5
        assert args["keepalives"] == 1
        assert args["tcp_user_timeout"] > 0
        assert "prepare_threshold" not in args
    finally:
        engine.dispose()


def test_prepared_statements_can_be_switched_off_for_a_pooler(database_url: str) -> None:
    engine = create_engine(database_url, postgres=PostgresOptions(prepared_statements=False))
    try:
        with engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            assert raw.prepare_threshold is None
    finally:
        engine.dispose()


def test_a_kept_connection_the_server_ended_while_idle_is_replaced_unseen(
    server: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The enqueue writer's connection is killed between two enqueues (as by a restart):
    the second enqueue still commits, at the first try."""
    from store import migrate

    db = Database(create_engine(database_url))
    migrate.upgrade(db)
    group = GroupEnqueue(db)
    monkeypatch.setattr(store_engine, "IDLE_CHECK", 0.0)
    try:
        assert group.enqueue(NewTask(name="t"), NOW) is None
        assert _terminate_others(server, database_url)
        assert group.enqueue(NewTask(name="t"), NOW) is None
    finally:
        group.close()
        db.dispose()


def test_a_direct_listener_hears_its_own_probe(database_url: str) -> None:
    db = Database(create_engine(database_url))
    listener = Listener(db)
    try:
        listener.connect()
        assert listener.hears(timeout=5)
    finally:
        listener.close()
        db.dispose()


def test_a_group_whose_connection_was_ended_commits_on_a_new_one(
    server: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle check out of the way: the group finds its connection dead, and tries once
    more on a new one."""
    from store import migrate

    monkeypatch.setattr(store_engine, "IDLE_CHECK", 1e9)
    db = Database(create_engine(database_url))
    migrate.upgrade(db)
    group = GroupEnqueue(db)
    try:
        assert group.enqueue(NewTask(name="t"), NOW) is None
        assert _terminate_others(server, database_url)
        news = [NewTask(name="t", args=[n]) for n in range(10)]

        async def enqueue_all() -> list[object]:
            calls = [group.enqueue_async(new, NOW) for new in news]
            return await asyncio.gather(*calls, return_exceptions=True)

        assert asyncio.run(enqueue_all()) == [None] * 10
    finally:
        group.close()
        db.dispose()


def test_a_group_on_a_server_out_of_reach_fails_at_once_not_task_by_task() -> None:
    """Twenty enqueues waiting together: one try to connect (two at most), not twenty-one."""
    db = Database(create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"))
    tries: list[int] = []
    sa.event.listen(db.engine, "do_connect", lambda *args: tries.append(1))
    group = GroupEnqueue(db)
    news = [NewTask(name="t", args=[n]) for n in range(20)]

    async def enqueue_all() -> list[object]:
        calls = [group.enqueue_async(new, NOW) for new in news]
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        answers = asyncio.run(enqueue_all())
    finally:
        group.close()
        db.dispose()
    assert all(isinstance(answer, sa.exc.OperationalError) for answer in answers)
    assert len(tries) <= 2


def _terminate_others(server: str, database_url: str) -> int:
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            ended = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": sa.make_url(database_url).database},
            ).scalar_one()
    finally:
        admin.dispose()
    return int(ended)
