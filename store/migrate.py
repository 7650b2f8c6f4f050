"""Applying Alembic's migrations, and checking the schema is current."""

from __future__ import annotations

from importlib.resources import files

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from store.engine import Database

# An arbitrary constant: the advisory lock every Backstop process takes to migrate.
MIGRATION_LOCK = 0x6261636B73746F70  # "backstop"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("store") / "migrations"))
    return config


def head_revision() -> str | None:
    """The newest migration this code ships."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The migration the database is at (None for an empty database)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> None:
    """Bring the database to `revision`; safe to run from several processes at once.

    On SQLite the migration runs in one `BEGIN IMMEDIATE` transaction, so a second process
    waits for the first and then finds nothing left to do; on PostgreSQL a transaction-level
    advisory lock does the same.
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
