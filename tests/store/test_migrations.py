"""The migrations build the schema the models describe, and run safely twice or at once.

That they ship in the wheel and run from it: tests/packaging/test_wheel.py.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import re
import sqlite3
import subprocess
import sys
import traceback
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from importlib.resources import files
from multiprocessing.synchronize import Barrier
from pathlib import Path
from uuid import uuid4

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from store import leases, migrate
from store.attempts import list_attempts
from store.engine import Database, create_database, drop_database
from store.models import Task, metadata, task_table
from store.tasks import NewTask, enqueue, get_task, stored_row, stored_task

REPO = Path(__file__).resolve().parents[2]
CLAIMABLE_INDEX = "ix_task_claimable"


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Database]:
    """A database on a file that does not exist yet."""
    db = Database.from_url(f"sqlite:///{tmp_path / 'fresh' / 'backstop.db'}")
    db.ensure_directory()
    yield db
    db.dispose()


# Each engine's catalogue of what a database holds: its tables, columns and indexes.
SCHEMA = {
    "sqlite": "SELECT type, name, sql FROM sqlite_master ORDER BY type, name",
    "postgresql": "SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    " UNION ALL SELECT 'column', table_name || '.' || column_name, data_type"
    " FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
}


def _schema(db: Database) -> list[tuple[str, str, str | None]]:
    with db.read() as conn:
        rows = conn.exec_driver_sql(SCHEMA[db.dialect]).all()
    return [(row[0], row[1], row[2]) for row in rows]


def test_upgrade_builds_the_schema_the_models_describe(db: Database) -> None:
    with db.read() as conn:
        diffs = compare_metadata(migrate.context(conn), metadata)
    # Alembic compares columns, types, indexes and their columns, not the sort direction of
    # `priority DESC` nor partial WHERE clauses: those are checked in the catalogue below.
    assert diffs == []


def _normalised(check: str) -> str:
    """A CHECK's text with the members of each IN list sorted, so the order is not compared."""

    def sort_members(found: re.Match[str]) -> str:
        return "IN (" + ", ".join(sorted(m.strip() for m in found[1].split(","))) + ")"

    return re.sub(r"IN \(([^)]*)\)", sort_members, " ".join(check.split()))


def test_upgrade_builds_the_check_constraints_the_models_describe(db: Database) -> None:
    # Alembic's comparison leaves CHECK constraints out, so they are compared here.
    with db.read() as conn:
        found = sa.inspect(conn).get_check_constraints("task")
    in_database = {check["name"]: _normalised(check["sqltext"]) for check in found}
    in_models = {
        check.name: _normalised(str(check.sqltext))
        for check in task_table.constraints
        if isinstance(check, sa.CheckConstraint)
    }
    assert len(in_models) == 5
    assert set(in_database) == set(in_models)
    # PostgreSQL keeps its own rewriting of each text (`status::text = ANY (ARRAY[...])`);
    # that it enforces each one: tests/store/test_tasks.py, on both engines.
    if db.dialect == "sqlite":
        assert in_database == in_models


# Each engine's catalogue of the task table's indexes, and two of them as it shows them.
INDEXES = {
    "sqlite": "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'task'",
    "postgresql": "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'task'",
}
PARTIAL_INDEXES = {
    "sqlite": {
        CLAIMABLE_INDEX: "CREATE INDEX ix_task_claimable ON task (priority DESC, scheduled_at)"
        " WHERE status IN ('queued', 'retrying') AND waiting_on = 0",
        "ix_task_lease_expiry": "CREATE INDEX ix_task_lease_expiry ON task (lease_expires_at)"
        " WHERE status = 'running'",
        "uq_task_unique_key_active": "CREATE UNIQUE INDEX uq_task_unique_key_active ON task"
        " (unique_key) WHERE status IN ('queued', 'running', 'retrying')"
        " AND unique_key IS NOT NULL",
    },
    "postgresql": {
        CLAIMABLE_INDEX: "CREATE INDEX ix_task_claimable ON public.task USING btree"
        " (priority DESC, scheduled_at) WHERE (((status)::text = ANY"
        " ((ARRAY['queued'::character varying, 'retrying'::character varying])::text[]))"
        " AND (waiting_on = 0))",
        "ix_task_lease_expiry": "CREATE INDEX ix_task_lease_expiry ON public.task USING btree"
        " (lease_expires_at) WHERE ((status)::text = 'running'::text)",
        "uq_task_unique_key_active": "CREATE UNIQUE INDEX uq_task_unique_key_active ON"
        " public.task USING btree (unique_key) WHERE (((status)::text = ANY"
        " ((ARRAY['queued'::character varying, 'running'::character varying,"
        " 'retrying'::character varying])::text[])) AND (unique_key IS NOT NULL))",
    },
}


def test_the_partial_indexes_exist_with_their_where_clauses(db: Database) -> None:
    with db.read() as conn:
        found = conn.exec_driver_sql(INDEXES[db.dialect]).all()
    rows: dict[str, str] = {name: " ".join(sql.split()) for name, sql in found if sql}
    for name, definition in PARTIAL_INDEXES[db.dialect].items():
        assert rows[name] == definition


def _attempts(db: Database) -> list[tuple[str, int, str]]:
    with db.read() as conn:
        rows = conn.exec_driver_sql(
            "SELECT task_id, number, worker FROM attempt ORDER BY task_id, number"
        ).all()
    return [(row[0], row[1], row[2]) for row in rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty(request: pytest.FixtureRequest, fresh: Database) -> Iterator[Database]:
    """An empty database: the SQLite file of `fresh`, or a new one on the PostgreSQL server
    (skipped when none answers), dropped after the test."""
    if request.param == "sqlite":
        yield fresh
        return
    server: str = request.getfixturevalue("server")
    name = f"backstop_test_{uuid4().hex[:16]}"
    db = Database.from_url(create_database(server, name))
    try:
        yield db
    finally:
        db.dispose()
        drop_database(server, name)


def test_is_current_only_after_upgrade(empty: Database) -> None:
    assert migrate.head_revision() == "0007_unique_key"
    assert migrate.is_current(empty) is False
    migrate.upgrade(empty)
    assert migrate.is_current(empty) is True
    with empty.read() as conn:
        assert migrate.current_revision(conn) == migrate.head_revision()


def test_upgrade_twice_changes_nothing(empty: Database) -> None:
    migrate.upgrade(empty)
    with empty.write() as conn:
        task = enqueue(conn, NewTask(name="kept"), now=datetime(2026, 3, 1, tzinfo=UTC))
    before = _schema(empty)
    migrate.upgrade(empty)
    assert _schema(empty) == before
    assert migrate.is_current(empty)
    with empty.read() as conn:
        assert get_task(conn, task.id) == task
        versions = conn.exec_driver_sql(
            f"SELECT version_num FROM {migrate.VERSION_TABLE}"
        ).scalars()
        assert list(versions) == [migrate.head_revision()]


def test_0002_keeps_every_attempt_and_refers_it_to_its_task_by_creation_time(
    empty: Database,
) -> None:
    migrate.upgrade(empty, "0001")
    with empty.write() as conn:  # rows as 0001 stored them
        first = _enqueue_before_0003(conn, "a", datetime(2026, 3, 1, tzinfo=UTC))
        second = _enqueue_before_0003(conn, "b", datetime(2026, 3, 2, tzinfo=UTC))
        conn.execute(
            sa.text(
                "INSERT INTO attempt (task_id, number, started_at, worker)"
                " VALUES (:task, :number, :started, :worker)"
            ),
            [
                {"task": task, "number": number, "started": datetime(2026, 3, day, tzinfo=UTC)}
                | {"worker": f"w{day}"}
                for task, number, day in ((first.id, 1, 3), (first.id, 2, 4), (second.id, 1, 5))
            ],
        )
    before = _attempts(empty)
    migrate.upgrade(empty)
    assert _attempts(empty) == before
    with empty.read() as conn:
        listed = list_attempts(conn, first.id)
        assert [(attempt.number, attempt.worker) for attempt in listed] == [(1, "w3"), (2, "w4")]
        unlinked = conn.exec_driver_sql(
            "SELECT count(*) FROM attempt JOIN task ON task.id = attempt.task_id"
            " WHERE attempt.task_created_at <> task.created_at"
        ).scalar()
        assert unlinked == 0
    with empty.write() as conn:  # the new foreign key cascades
        conn.execute(sa.delete(task_table).where(task_table.c.id == second.id))
    assert [row[0] for row in _attempts(empty)] == [first.id, first.id]


@pytest.mark.sqlite_only(reason="a connection without foreign keys: PostgreSQL has none")
def test_0002_drops_attempts_whose_task_is_gone_and_says_so(
    fresh: Database, caplog: pytest.LogCaptureFixture
) -> None:
    migrate.upgrade(fresh, "0001")
    # Deleted by a connection with foreign keys off (sqlite3's default): the attempt has no
    # creation time to carry over. (PostgreSQL always enforces the key.)
    with closing(sqlite3.connect(str(fresh.engine.url.database))) as raw, raw:
        raw.execute(
            "INSERT INTO attempt (task_id, number, started_at, worker)"
            " VALUES ('gone', 1, '2026-03-06 00:00:00.000000', 'w')"
        )
    with caplog.at_level(logging.WARNING):
        migrate.upgrade(fresh)
    assert _attempts(fresh) == []
    assert "1 attempts of tasks that no longer exist were dropped" in caplog.text


def test_0002_downgrades_to_0001_and_back(empty: Database) -> None:
    migrate.upgrade(empty)
    with empty.write() as conn:
        task = enqueue(conn, NewTask(name="a"))
        leases.claim_due(conn, "w", 1, lease_seconds=30)
    url = empty.engine.url.render_as_string(hide_password=False)
    for step in (["downgrade", "0001"], ["upgrade", "head"]):
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *step],
            env={**os.environ, "BACKSTOP_DATABASE_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    assert migrate.is_current(empty)
    assert _attempts(empty) == [(task.id, 1, "w")]


def _enqueue_before_0003(conn: sa.Connection, name: str, now: datetime) -> Task:
    """A task stored in a schema older than 0003, which has no `trace_context` column (nor
    0004's `progress`, nor 0005's links, 0007's `unique_key`)."""
    row = stored_row(NewTask(name=name), now)
    for later in (
        "trace_context",
        "progress",
        "parent_id",
        "after",
        "waiting_on",
        "has_dependants",
        "unique_key",
    ):
        del row[later]
    conn.execute(sa.insert(task_table).values(row))
    return stored_task(NewTask(name=name, id=row["id"]), now)


def _as_before_the_rename(db: Database) -> None:
    """Put the database's revision where Backstop kept it before it had its own table."""
    script = ScriptDirectory(str(files("store") / "migrations"))
    with db.write() as conn:
        revision = migrate.current_revision(conn)
        assert revision is not None
        conn.exec_driver_sql(f"DROP TABLE {migrate.VERSION_TABLE}")
        MigrationContext.configure(conn).stamp(script, revision)


def _tables(db: Database) -> set[str]:
    with db.read() as conn:
        return set(sa.inspect(conn).get_table_names())


def _old_versions(db: Database) -> list[str]:
    with db.read() as conn:
        return list(conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars())


@pytest.mark.parametrize("revision", ["0001", "0002"])
def test_a_database_migrated_under_the_old_table_name_moves_over_with_its_tasks(
    empty: Database, revision: str
) -> None:
    migrate.upgrade(empty, revision)
    with empty.write() as conn:
        tasks = [
            _enqueue_before_0003(conn, name, datetime(2026, 3, 1, tzinfo=UTC))
            for name in ("a", "b")
        ]
    _as_before_the_rename(empty)
    assert _old_versions(empty) == [revision]
    assert migrate.is_current(empty) is False

    migrate.upgrade(empty)

    assert migrate.is_current(empty)
    assert "alembic_version" not in _tables(empty)
    with empty.read() as conn:
        assert [get_task(conn, task.id) for task in tasks] == tasks
        versions = conn.exec_driver_sql(f"SELECT version_num FROM {migrate.VERSION_TABLE}")
        assert list(versions.scalars()) == [migrate.head_revision()]


def test_a_teams_row_in_the_old_table_stays_there(empty: Database) -> None:
    migrate.upgrade(empty)
    _as_before_the_rename(empty)
    with empty.write() as conn:
        conn.exec_driver_sql("INSERT INTO alembic_version (version_num) VALUES ('user0001')")

    migrate.upgrade(empty)

    assert _old_versions(empty) == ["user0001"]
    assert migrate.is_current(empty)


def test_a_teams_revision_named_like_backstops_is_not_taken(empty: Database) -> None:
    # A team's own Alembic at "0001" on a database Backstop never used: no `task` table.
    with empty.write() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"
        )
        conn.exec_driver_sql("INSERT INTO alembic_version (version_num) VALUES ('0001')")

    migrate.upgrade(empty)

    assert _old_versions(empty) == ["0001"]
    assert migrate.is_current(empty)
    assert {"task", "attempt", "schedule"} <= _tables(empty)


def test_alembic_itself_moves_an_old_named_database_over(empty: Database) -> None:
    migrate.upgrade(empty)
    _as_before_the_rename(empty)
    url = empty.engine.url.render_as_string(hide_password=False)

    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "upgrade", "head"],
        env={**os.environ, "BACKSTOP_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert migrate.is_current(empty)
    assert "alembic_version" not in _tables(empty)


def _upgrade_in_process(url: str, meet: Barrier, out: multiprocessing.Queue[str]) -> None:
    """A spawned process that upgrades the database as soon as its twin is ready too."""
    db = Database.from_url(url)
    try:
        meet.wait(timeout=20)
        migrate.upgrade(db)
        out.put("current" if migrate.is_current(db) else "behind")
    except BaseException:
        out.put(traceback.format_exc())
        raise
    finally:
        db.dispose()


def test_two_processes_can_upgrade_a_new_database_at_once(empty: Database) -> None:
    # On SQLite a file that does not exist yet: both turn it to WAL, then queue on BEGIN
    # IMMEDIATE; on PostgreSQL both wait on the migration's advisory lock.
    url = empty.engine.url.render_as_string(hide_password=False)
    ctx = multiprocessing.get_context("spawn")
    meet = ctx.Barrier(2)
    out: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_upgrade_in_process, args=(url, meet, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        answers = [out.get(timeout=45) for _ in procs]
    except queue.Empty:
        pytest.fail("an upgrading process did not report in time")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert answers == ["current", "current"]
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert migrate.is_current(empty)
    with empty.read() as conn:
        versions = conn.exec_driver_sql(f"SELECT version_num FROM {migrate.VERSION_TABLE}")
        assert list(versions.scalars()) == [migrate.head_revision()]
