"""The health of writes: every write reports how it went, a bounded write gives up in time,
and a SQLite file deleted or replaced under the process is seen before anything lands in it."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from store.engine import Database, temporary_database
from store.errors import DatabaseFileGone, DatabaseUnavailable, WriteTimeout
from store.health import as_unavailable
from store.migrate import touch_version, upgrade
from store.tasks import NewTask, enqueue


def _path(db: Database) -> Path:
    return Path(str(db.engine.url.database))


@pytest.fixture
def held_lock(db: Database) -> Iterator[sqlite3.Connection]:
    """Another connection, as another process would, holds the write lock until closed."""
    holder = sqlite3.connect(_path(db), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    yield holder
    holder.close()


@pytest.mark.sqlite_only(
    reason="another connection holds SQLite's write lock (PostgreSQL: a test of its own, below)"
)
def test_a_failed_write_is_the_problem_until_a_write_commits(
    db: Database, held_lock: sqlite3.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    db.health.succeeded()  # a process that has written before (at start, the caller says why)
    assert db.health.problem is None
    for _ in range(3):
        with pytest.raises(OperationalError), db.write(wait=0.05) as conn:
            touch_version(conn)
    assert db.health.problem is not None
    assert "database is locked" in db.health.problem

    held_lock.rollback()
    with db.write() as conn:
        touch_version(conn)

    assert db.health.problem is None
    said = [record.getMessage() for record in caplog.records if record.name == "store.health"]
    assert said == [
        "writes to the database fail: the database cannot take writes: database is locked",
        "the database takes writes again",
    ]


@pytest.mark.sqlite_only(reason="a process takes turns at writing on SQLite only")
def test_a_write_that_cannot_have_this_process_s_turn_in_time_gives_up(db: Database) -> None:
    """Another thread's write holds the process's turn: a bounded write does not wait it out."""
    inside, leave = threading.Event(), threading.Event()

    def long_write() -> None:
        with db.write():
            inside.set()
            leave.wait(10)

    writer = threading.Thread(target=long_write)
    writer.start()
    try:
        assert inside.wait(10)
        with pytest.raises(WriteTimeout), db.write(wait=0.05):
            pytest.fail("the write went ahead")
        assert db.health.problem is not None
    finally:
        leave.set()
        writer.join()


def test_errors_about_the_request_are_not_about_the_database_s_health() -> None:
    broken = IntegrityError("INSERT INTO task ...", {"secret": 1}, Exception("CHECK failed"))
    full = OperationalError("INSERT INTO task ...", {"secret": 1}, Exception("disk is full"))

    assert as_unavailable(broken) is None
    unavailable = as_unavailable(full)
    assert isinstance(unavailable, DatabaseUnavailable)
    assert unavailable.reason == "the database cannot take writes: disk is full"


def _write_a_task(db: Database) -> None:
    with db.write() as conn:
        enqueue(conn, NewTask(name="t"))


@pytest.mark.sqlite_only(reason="a SQLite file")
def test_a_file_deleted_under_the_process_stops_its_writes_with_one_line(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    _write_a_task(db)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{_path(db)}{suffix}").unlink(missing_ok=True)

    for _ in range(3):
        with pytest.raises(DatabaseFileGone, match="was deleted while this process had it open"):
            _write_a_task(db)

    assert db.health.gone is not None
    assert db.health.problem == db.health.gone
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == [db.health.gone]


@pytest.mark.sqlite_only(reason="a SQLite file")
def test_a_file_replaced_under_the_process_is_seen_before_the_commit(db: Database) -> None:
    """The write that finds another file at the path is rolled back: nothing lands in the
    file that was there before, which no other process sees any more."""
    _write_a_task(db)
    path = _path(db)
    replacement = path.with_name("other.db")
    sqlite3.connect(replacement).close()

    def replaced_mid_transaction() -> None:
        with db.write() as conn:
            conn.execute(sa.text("DELETE FROM task"))
            os.replace(replacement, path)  # a restore copied over it

    with pytest.raises(DatabaseFileGone, match="was replaced by another file"):
        replaced_mid_transaction()

    assert db.health.gone is not None
    with pytest.raises(DatabaseFileGone):
        _write_a_task(db)


def test_a_bounded_write_on_postgresql_gives_up_on_a_row_lock(server: str) -> None:
    """Another transaction holds the task's row: the write fails within its bound, and says
    so, instead of waiting for as long as that transaction lasts."""
    with temporary_database(server) as url:
        db = Database.from_url(url)
        other = sa.create_engine(url)
        try:
            upgrade(db)
            new = NewTask(name="t")
            with db.write() as conn:
                enqueue(conn, new)
            with other.connect() as holder, holder.begin():
                holder.execute(sa.text("SELECT id FROM task FOR UPDATE"))
                with pytest.raises(OperationalError, match="lock timeout"):
                    _raise_priority(db, new.id, wait=0.1)
                assert db.health.problem is not None
        finally:
            other.dispose()
            db.dispose()


def _raise_priority(db: Database, task_id: str, *, wait: float) -> None:
    with db.write(wait=wait) as conn:
        conn.execute(sa.text("UPDATE task SET priority = 1 WHERE id = :id"), {"id": task_id})
