"""The store's contract suite runs on both engines.

Every test that takes `db` runs twice: `[sqlite]` on a SQLite file of its own, and
`[postgresql]` on a PostgreSQL database of the session, on the server `answering_server`
finds (skipped without one, failed under `CI=true`). A test of SQLite's own machinery (WAL,
its write lock, rowids...) says so with `@pytest.mark.sqlite_only(reason=...)` and runs
once, on SQLite.

Each engine migrates once a session. A SQLite test gets a copy of the migrated file. The
PostgreSQL tests take turns on one migrated database, emptied before each: no rows, attempt
ids from 1, as newly migrated; should a test have changed its schema, the next one gets a
new database. A database copied from a template and dropped for each test cost more than
most tests: every `DROP DATABASE` waits for a checkpoint of the whole server (15 ms on a
quiet one, over a second on a busy one), where emptying takes milliseconds. A test that
changes the schema on purpose takes a database of its own (`temporary_database`).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from store import migrate
from store.engine import Database, create_database, drop_database
from store.models import metadata
from tests.conftest import answering_server

ENGINES = ("sqlite", "postgresql")

# What the database holds besides rows: its relations and their columns, constraints,
# triggers and functions. When a test changed any of it, emptying is not enough.
SCHEMA_PRINT = """SELECT md5(string_agg(item, ',' ORDER BY item)) FROM (
    SELECT concat_ws(' ', c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE n.nspname = 'public'
    UNION ALL SELECT concat_ws(' ', conname, pg_get_constraintdef(oid)) FROM pg_constraint
    WHERE connamespace = 'public'::regnamespace
    UNION ALL SELECT tgname FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL SELECT oid::regprocedure::text FROM pg_proc
    WHERE pronamespace = 'public'::regnamespace
) AS schema (item)"""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise `dialect` (and so `db`) over both engines, or SQLite alone when marked."""
    if "dialect" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("sqlite_only")
    if only is not None and not only.kwargs.get("reason"):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: sqlite_only needs a reason=")
    metafunc.parametrize("dialect", ["sqlite"] if only else ENGINES, indirect=True)


@pytest.fixture
def dialect(request: pytest.FixtureRequest) -> str:
    """The test's engine: "sqlite" or "postgresql" (as `Database.dialect` names it)."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the newest revision, for the tests to copy."""
    path = tmp_path_factory.mktemp("template") / "backstop.db"
    template = Database.from_url(f"sqlite:///{path}")
    try:
        migrate.upgrade(template)
    finally:
        template.dispose()  # the last connection out folds the WAL into the file
    return path


class ChangedSchema(Exception):
    """A test left the schema other than the migrations made it."""


class PostgresDatabase:
    """The session's migrated PostgreSQL database, emptied before each test. When a test
    changed its schema, or emptying it fails (a lock held by a connection a test left
    behind), it is made anew."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.name = ""
        self.db, self.schema = self._make()

    def _make(self) -> tuple[Database, str]:
        self.name = f"backstop_test_{uuid.uuid4().hex[:16]}"
        db = Database.from_url(create_database(self.server, self.name))
        migrate.upgrade(db)
        with db.read() as conn:
            return db, conn.exec_driver_sql(SCHEMA_PRINT).scalar_one()

    def empty(self) -> None:
        """Delete every row of Backstop's tables and start attempt ids over from 1."""
        try:
            with self.db.write() as conn:
                if conn.exec_driver_sql(SCHEMA_PRINT).scalar_one() != self.schema:
                    raise ChangedSchema
                conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
                for table in reversed(metadata.sorted_tables):
                    conn.execute(table.delete())
                conn.exec_driver_sql(
                    "SELECT setval(pg_get_serial_sequence('attempt', 'id'), 1, false)"
                )
        except (ChangedSchema, sa.exc.DBAPIError):
            self.drop()
            self.db, self.schema = self._make()

    def url(self) -> str:
        """The database's URL, password included."""
        return self.db.engine.url.render_as_string(hide_password=False)

    def drop(self) -> None:
        """Drop the database, closing whatever connections it still has."""
        self.db.dispose()
        drop_database(self.server, self.name)


@pytest.fixture(scope="session")
def postgresql_database() -> Iterator[PostgresDatabase]:
    """The session's PostgreSQL database (skips, or fails under CI, without a server)."""
    made = PostgresDatabase(answering_server())
    try:
        yield made
    finally:
        made.drop()


@pytest.fixture
def db(dialect: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """The test's migrated, empty database, on the engine `dialect` names."""
    if dialect == "sqlite":
        path = tmp_path / "data" / "backstop.db"
        path.parent.mkdir()
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
    else:
        postgresql: PostgresDatabase = request.getfixturevalue("postgresql_database")
        postgresql.empty()
        url = postgresql.url()
    database = Database.from_url(url)
    yield database
    database.dispose()
