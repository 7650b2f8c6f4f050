"""Alembic's entry point: a connection handed in by `store.migrate`, or a URL from the
environment (`BACKSTOP_DATABASE_URL`, else the SQLite file under `BACKSTOP_DATA_DIR`) or from
`sqlalchemy.url` in alembic.ini.

Backstop's history lives in `backstop_alembic_version`, never in Alembic's default table, so
a team's own Alembic can share the database; its autogenerate looks at Backstop's tables only.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy.engine import Connection

from store.engine import create_engine, default_url
from store.migrate import VERSION_TABLE, adopt_old_version_table, only_backstop_tables
from store.models import metadata

config = context.config


def _url() -> str:
    return (
        os.environ.get("BACKSTOP_DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
        or default_url(os.environ.get("BACKSTOP_DATA_DIR", "./data"))
    )


def _run(connection: Connection) -> None:
    # Before Alembic reads the version: a database migrated under the old table name moves
    # to the new one in the transaction that then migrates it.
    adopt_old_version_table(connection)
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=only_backstop_tables,
        # SQLite cannot ALTER most things, so later migrations copy the table.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    engine = create_engine(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=_url(), target_metadata=metadata, version_table=VERSION_TABLE, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
