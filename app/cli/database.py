"""The database a `backstop tasks` or `backstop schedules` command works on.

These commands read and change what a service has stored, so they never create a database
nor migrate one: a SQLite file that does not exist (the command runs from another folder than
the service, or without its settings) or a schema that is not this Backstop's newest is
refused in one line that says what to do. `backstop db upgrade`, `serve` and `worker` are the
commands that create and migrate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from app.backstop import Backstop
from app.errors import BackstopError
from app.settings import Settings
from store import migrate


class DatabaseRefused(BackstopError):
    """The configured database does not exist, or its schema is not current."""


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, made absolute; None for another database."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database).absolute()


def describe(url: str) -> str:
    """How a message names the database: the SQLite file, or the URL without its password."""
    path = sqlite_file(url)
    if path is not None:
        return str(path)
    return sa.make_url(url).render_as_string(hide_password=True)


def _schema_problem(current: str | None, where: str) -> str | None:
    head = migrate.head_revision()
    if current == head:
        return None
    if current is None:
        return f"the database at {where} has no Backstop schema yet: run 'backstop db upgrade'"
    if current in migrate.known_revisions():
        return (
            f"the database at {where} is at migration {current}, behind this Backstop's "
            f"{head}: run 'backstop db upgrade'"
        )
    return (
        f"the database at {where} is at migration {current!r}, which this Backstop does not "
        "know: a newer Backstop has migrated it"
    )


@contextmanager
def existing_service(settings: Settings | None = None) -> Iterator[Backstop]:
    """A Backstop on the configured database, which must exist and be current."""
    settings = settings or Settings()
    path = sqlite_file(settings.url)
    if path is not None and not path.is_file():
        raise DatabaseRefused(
            f"no database at {path}: point BACKSTOP_DATABASE_URL (or BACKSTOP_DATA_DIR) at "
            "the service's database, or create this one with 'backstop db upgrade'"
        )
    backstop = Backstop(settings)
    try:
        with backstop.db.read() as conn:
            problem = _schema_problem(migrate.current_revision(conn), describe(settings.url))
        if problem is not None:
            raise DatabaseRefused(problem)
        yield backstop
    finally:
        backstop.close()
