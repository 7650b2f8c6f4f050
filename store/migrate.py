"""Applying Alembic's migrations, checking the schema is current, and sharing the database
with a team's own Alembic.

Backstop records its history in a version table of its own, `backstop_alembic_version`, so a
team's Alembic keeps `alembic_version` to itself. Databases migrated before Backstop had its
own table are moved over by the next upgrade (`adopt_old_version_table`).
"""

from __future__ import annotations

from importlib.resources import files

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.environment import NameFilterParentNames, NameFilterType
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from store.engine import Database
from store.models import metadata

# An arbitrary constant: the advisory lock every Backstop process takes to migrate.
MIGRATION_LOCK = 0x6261636B73746F70  # "backstop"

VERSION_TABLE = "backstop_alembic_version"
# Where Backstop's history lived before it had a table of its own: Alembic's default.
OLD_VERSION_TABLE = "alembic_version"

BACKSTOP_TABLES: frozenset[str] = frozenset({*metadata.tables, VERSION_TABLE})
"""Every table Backstop creates, its version table included (all in the default schema)."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("store") / "migrations"))
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def context(conn: Connection) -> MigrationContext:
    """Alembic's view of Backstop's part of the database on `conn`: its version table, and
    its tables alone for comparisons (`alembic.autogenerate.compare_metadata`)."""
    return MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE, "include_name": only_backstop_tables}
    )


def head_revision() -> str | None:
    """The newest migration this code ships."""
    return _script().get_current_head()


def known_revisions() -> set[str]:
    """Every migration this code ships."""
    return {script.revision for script in _script().walk_revisions()}


def current_revision(conn: Connection) -> str | None:
    """The migration the database is at (None for an empty database)."""
    return context(conn).get_current_revision()


def without_backstop_tables(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """An Alembic `include_name` for a team's own `env.py`: everything but Backstop's tables,
    so that the team's autogenerate (and `alembic check`) never proposes dropping them."""
    if type_ != "table":
        return True
    return parent_names.get("schema_name") is not None or name not in BACKSTOP_TABLES


def only_backstop_tables(
    name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
) -> bool:
    """Backstop's own `include_name`: its tables alone, never a team's that share the database."""
    if type_ != "table":
        return True
    return parent_names.get("schema_name") is None and name in BACKSTOP_TABLES


def adopt_old_version_table(conn: Connection) -> list[str]:
    """Move Backstop's revision from `alembic_version` to `backstop_alembic_version`, in the
    caller's transaction; the revisions moved (none when there was nothing to move).

    A row counts as Backstop's when it names one of Backstop's revisions and Backstop's
    `task` table exists: a team's own Alembic may use the same short ids. Any other row (a
    team's) stays, and `alembic_version` is dropped only when nothing is left in it.
    """
    tables = set(sa.inspect(conn).get_table_names())
    if VERSION_TABLE in tables or OLD_VERSION_TABLE not in tables or "task" not in tables:
        return []
    old = sa.table(OLD_VERSION_TABLE, sa.column("version_num", sa.String))
    known = known_revisions()
    ours = [
        revision
        for revision in conn.execute(sa.select(old.c.version_num)).scalars()
        if revision in known
    ]
    if not ours:
        return []
    new, script = context(conn), _script()
    for revision in ours:
        new.stamp(script, revision)
    conn.execute(sa.delete(old).where(old.c.version_num.in_(ours)))
    if conn.execute(sa.select(sa.func.count()).select_from(old)).scalar_one() == 0:
        conn.execute(sa.text(f"DROP TABLE {OLD_VERSION_TABLE}"))
    return ours


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the database to `revision`; safe to run from several processes at once.

    On SQLite the migration runs in one `BEGIN IMMEDIATE` transaction, so a second process
    waits for the first and then finds nothing left to do; on PostgreSQL a transaction-level
    advisory lock does the same. A database migrated under the old version table is moved
    to the new one in the same transaction (`env.py` calls `adopt_old_version_table`).
    """
    config = _config()
    db.ensure_directory()
    with db.write() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def is_current(db: Database) -> bool:
    """Whether the database answers and sits at the newest migration."""
    with db.read() as conn:
        return current_revision(conn) == head_revision()


def touch_version(conn: Connection) -> None:
    """A real write that changes nothing: the version row rewritten as it is.

    Taking the write lock does not show a full disk; committing a written row does, and
    SQLite and PostgreSQL both write an updated row even when no value changes.
    """
    conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = version_num"))
