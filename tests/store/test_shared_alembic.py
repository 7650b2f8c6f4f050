"""A team's own Alembic and Backstop's migrations on one database, in either order.

The team's project is a real one in a temporary folder (its alembic.ini, its env.py following
docs/migrations.md, one revision `user0001`), driven through the `alembic` and `backstop`
commands as the team would run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from store import migrate
from store.engine import Database, temporary_database
from store.models import metadata
from tests.support.projects import write_files

BACKSTOP = str(Path(sys.executable).parent / "backstop")

TEAM_FILES = {
    "alembic.ini": """
        [alembic]
        script_location = %(here)s/migrations
        prepend_sys_path = .
        path_separator = os
        """,
    "myservice/__init__.py": "",
    "myservice/models.py": '''
        """The team's own tables."""

        import sqlalchemy as sa

        metadata = sa.MetaData()

        account = sa.Table(
            "account",
            metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("email", sa.String(200), nullable=False),
        )
        ''',
    "migrations/env.py": '''
        """The team's env.py: Alembic's default version table, Backstop's tables left out."""

        import os

        import sqlalchemy as sa
        from alembic import context

        from myservice.models import metadata
        from store.migrate import without_backstop_tables

        url = os.environ["DATABASE_URL"]

        if context.is_offline_mode():
            context.configure(url=url, target_metadata=metadata, literal_binds=True)
            with context.begin_transaction():
                context.run_migrations()
        else:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
            with engine.connect() as connection:
                context.configure(
                    connection=connection,
                    target_metadata=metadata,
                    include_name=without_backstop_tables,
                )
                with context.begin_transaction():
                    context.run_migrations()
        ''',
    "migrations/script.py.mako": '''
        """${message}"""

        from alembic import op
        import sqlalchemy as sa
        ${imports if imports else ""}

        revision = ${repr(up_revision)}
        down_revision = ${repr(down_revision)}
        branch_labels = ${repr(branch_labels)}
        depends_on = ${repr(depends_on)}


        def upgrade():
            ${upgrades if upgrades else "pass"}


        def downgrade():
            ${downgrades if downgrades else "pass"}
        ''',
    "migrations/versions/user0001_accounts.py": '''
        """accounts"""

        import sqlalchemy as sa
        from alembic import op

        revision = "user0001"
        down_revision = None
        branch_labels = None
        depends_on = None


        def upgrade():
            op.create_table(
                "account",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("email", sa.String(200), nullable=False),
            )


        def downgrade():
            op.drop_table("account")
        ''',
}


@pytest.fixture
def team(tmp_path: Path) -> Path:
    """The team's project folder."""
    return write_files(tmp_path / "team", TEAM_FILES)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database both sides share: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    server: str = request.getfixturevalue("server")
    with temporary_database(server, "backstop_test") as made:
        yield made


def run(cwd: Path, url: str, *command: str) -> subprocess.CompletedProcess[str]:
    """Run a command in the team's folder, as the team would; it must succeed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BACKSTOP_")}
    env.pop("PYTHONPATH", None)
    env.update(DATABASE_URL=url, BACKSTOP_DATABASE_URL=url)
    done = subprocess.run(
        list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"
    return done


def team_alembic(team: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(team, url, sys.executable, "-m", "alembic", *args)


def backstop_upgrade(team: Path, url: str) -> None:
    run(team, url, BACKSTOP, "db", "upgrade")


def versions(url: str, table: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT version_num FROM {table}")).scalars()
            return sorted(rows)
    finally:
        engine.dispose()


def assert_both_histories_intact(team: Path, url: str) -> None:
    assert versions(url, "alembic_version") == ["user0001"]
    assert versions(url, migrate.VERSION_TABLE) == [migrate.head_revision()]
    assert "user0001 (head)" in team_alembic(team, url, "current").stdout
    db = Database.from_url(url)
    try:
        assert migrate.is_current(db)
        with db.read() as conn:
            assert {"account", *migrate.BACKSTOP_TABLES} <= set(sa.inspect(conn).get_table_names())
    finally:
        db.dispose()
    # The team's autogenerate finds nothing to do: no drop of Backstop's tables.
    checked = team_alembic(team, url, "check")
    assert "No new upgrade operations detected" in checked.stdout + checked.stderr


def test_the_team_migrates_first_then_backstop(team: Path, url: str) -> None:
    team_alembic(team, url, "upgrade", "head")

    backstop_upgrade(team, url)

    assert_both_histories_intact(team, url)
    team_alembic(team, url, "upgrade", "head")  # nothing left for either side
    backstop_upgrade(team, url)
    assert versions(url, "alembic_version") == ["user0001"]
    assert versions(url, migrate.VERSION_TABLE) == [migrate.head_revision()]


def test_backstop_migrates_first_then_the_team(team: Path, url: str) -> None:
    backstop_upgrade(team, url)

    team_alembic(team, url, "upgrade", "head")

    assert_both_histories_intact(team, url)


def test_the_team_can_downgrade_its_own_history_without_touching_backstops(
    team: Path, url: str
) -> None:
    backstop_upgrade(team, url)
    team_alembic(team, url, "upgrade", "head")

    team_alembic(team, url, "downgrade", "base")

    assert versions(url, "alembic_version") == []
    assert versions(url, migrate.VERSION_TABLE) == [migrate.head_revision()]


def test_without_the_helper_the_teams_autogenerate_would_drop_backstops_tables(
    url: str,
) -> None:
    # What the recipe's `include_name` is for: the same comparison with and without it.
    db = Database.from_url(url)
    try:
        migrate.upgrade(db)
        with db.read() as conn:
            plain = compare_metadata(MigrationContext.configure(conn), sa.MetaData())
            helped = compare_metadata(
                MigrationContext.configure(
                    conn, opts={"include_name": migrate.without_backstop_tables}
                ),
                sa.MetaData(),
            )
    finally:
        db.dispose()
    dropped = {diff[1].name for diff in plain if diff[0] == "remove_table"}
    assert dropped == set(migrate.BACKSTOP_TABLES)
    assert helped == []


def test_backstops_own_comparison_ignores_the_teams_tables(team: Path, url: str) -> None:
    team_alembic(team, url, "upgrade", "head")
    backstop_upgrade(team, url)
    db = Database.from_url(url)
    try:
        with db.read() as conn:
            diffs = compare_metadata(migrate.context(conn), metadata)
    finally:
        db.dispose()
    assert diffs == []
