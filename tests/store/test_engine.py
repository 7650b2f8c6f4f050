"""The engines: SQLite's write lock, WAL and pragmas; on both, rollbacks and UTC times."""

from __future__ import annotations

import re
import sqlite3
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError

from store.engine import Database, Synchronous, create_engine, default_url
from store.models import attempt_table
from store.tasks import NewTask, count_by_status, enqueue, get_task

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _url(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=False)


@pytest.fixture
def impatient(db: Database) -> Iterator[Database]:
    """A second engine on the test's file that gives up on a lock after 50 ms."""
    other = Database.from_url(_url(db), busy_timeout_ms=50)
    yield other
    other.dispose()


@pytest.mark.sqlite_only(reason="SQLite's one write lock: PostgreSQL writers lock rows")
def test_a_write_transaction_takes_the_write_lock_at_begin(
    db: Database, impatient: Database
) -> None:
    # The holder runs no statement: only BEGIN IMMEDIATE can hold the lock, and only BEGIN
    # IMMEDIATE on the other side can fail before its first write.
    with (
        db.write(),
        pytest.raises(OperationalError, match="database is locked"),
        impatient.write() as conn,
    ):
        conn.execute(sa.text("SELECT 1"))
    with impatient.write() as conn:
        enqueue(conn, NewTask(name="after"), now=T)
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 1


def test_a_read_goes_on_while_a_write_is_open(db: Database, impatient: Database) -> None:
    with db.write() as conn:
        enqueue(conn, NewTask(name="first"), now=T)
    with db.write() as writer:
        enqueue(writer, NewTask(name="uncommitted"), now=T)
        with impatient.read() as reader:
            # Under WAL the reader neither waits nor sees the open transaction's row.
            assert sum(count_by_status(reader).values()) == 1
    with impatient.read() as reader:
        assert sum(count_by_status(reader).values()) == 2


def test_a_failed_write_rolls_back(db: Database) -> None:
    def enqueue_then_fail() -> None:
        with db.write() as conn:
            enqueue(conn, NewTask(name="lost"), now=T)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        enqueue_then_fail()
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 0


@pytest.mark.sqlite_only(reason="SQLite's pragmas")
def test_the_journal_is_wal_and_foreign_keys_are_on(db: Database) -> None:
    with db.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000


def test_a_foreign_key_is_enforced(db: Database) -> None:
    with pytest.raises(IntegrityError, match=r"(?i)FOREIGN KEY"), db.write() as conn:
        conn.execute(
            sa.insert(attempt_table),
            [
                {
                    "task_id": "missing",
                    "task_created_at": T,
                    "number": 1,
                    "started_at": T,
                    "worker": "w",
                }
            ],
        )


@pytest.mark.sqlite_only(reason="SQLite's pragmas")
@pytest.mark.parametrize(("setting", "value"), [("NORMAL", 1), ("FULL", 2), ("OFF", 0)])
def test_the_synchronous_setting_is_applied(db: Database, setting: Synchronous, value: int) -> None:
    other = Database.from_url(_url(db), synchronous=setting)
    try:
        with other.read() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == value
        with other.write() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == value
    finally:
        other.dispose()


@pytest.mark.sqlite_only(reason="SQLite's pragmas")
def test_the_default_synchronous_is_normal(db: Database) -> None:
    with db.read() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1


def test_timestamps_come_back_aware_in_utc(db: Database) -> None:
    plus_five = timezone(timedelta(hours=5))
    local = datetime(2026, 3, 1, 17, 0, 0, 123456, tzinfo=plus_five)
    with db.write() as conn:
        task = enqueue(conn, NewTask(name="t"), now=local)
    with db.read() as conn:
        stored = get_task(conn, task.id)
        raw = conn.exec_driver_sql("SELECT created_at FROM task").scalar()
    assert stored.created_at.tzinfo is UTC
    assert stored.created_at == local
    assert stored.created_at == datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    if db.dialect == "sqlite":
        # Stored as naive UTC text, so that text order is time order.
        assert raw == "2026-03-01 12:00:00.123456"
    else:
        assert raw == stored.created_at  # a timestamptz: the instant itself


def test_naive_datetimes_are_refused(db: Database) -> None:
    with (
        pytest.raises(StatementError, match="expected an aware datetime"),
        db.write() as conn,
    ):
        enqueue(conn, NewTask(name="t"), now=datetime(2026, 3, 1, 12, 0))
    with pytest.raises(StatementError, match="expected an aware datetime"), db.read() as conn:
        conn.execute(
            sa.select(attempt_table).where(attempt_table.c.started_at < datetime(2026, 3, 1))
        )
    with db.read() as conn:
        assert sum(count_by_status(conn).values()) == 0


@pytest.mark.sqlite_only(reason="a SQLite URL")
@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=memory"])
def test_an_in_memory_database_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="needs a SQLite file"):
        Database.from_url(url)


@pytest.mark.sqlite_only(reason="the default database is a SQLite file")
def test_the_default_url_is_a_file_in_the_data_folder(tmp_path: Path) -> None:
    db = Database.from_url(default_url(tmp_path / "nested" / "data"))
    try:
        db.ensure_directory()
        with db.write() as conn:
            conn.execute(sa.text("CREATE TABLE probe (x INTEGER)"))
    finally:
        db.dispose()
    assert (tmp_path / "nested" / "data" / "backstop.db").is_file()


@pytest.mark.sqlite_only(reason="SQLite's WAL")
def test_a_new_file_turns_to_wal_once_a_writer_on_it_lets_go(tmp_path: Path) -> None:
    # What two processes starting on a new file meet: one holds the write lock before the
    # file is in WAL. SQLite refuses the other's switch to WAL at once, without busy_timeout.
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE probe (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO probe VALUES (1)")
    let_go = threading.Timer(0.2, holder.execute, ["COMMIT"])
    let_go.start()
    db = Database.from_url(f"sqlite:///{path}", busy_timeout_ms=10_000)
    try:
        with db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("SELECT count(*) FROM probe").scalar() == 1
    finally:
        db.dispose()
        let_go.cancel()
        let_go.join()
        holder.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root@localhost/app", "SQLite or PostgreSQL, not 'mysql'"),
        ("postgresql+psycopg2://postgres@127.0.0.1/x", "write the URL as postgresql+psycopg://"),
    ],
)
def test_a_database_backstop_cannot_use_is_refused_naming_the_right_form(
    url: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        create_engine(url)


def test_postgresql_without_psycopg_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"install backstop-tasks\[postgres\]"):
        create_engine("postgresql+psycopg://postgres@127.0.0.1/x")
