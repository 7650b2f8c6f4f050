"""`backstop db copy --to URL`, run as the installed command: a SQLite queue moved into a
PostgreSQL database of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from store import migrate
from store.copy import count_rows
from store.engine import Database, temporary_database
from store.leases import claim_due
from store.tasks import NewTask, enqueue
from store.timeutil import utcnow
from tests.app.cli.test_commands import assert_one_line_error, backstop
from tests.support.states import one_of_each


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Database]:
    """The service's SQLite queue in `data/`, migrated, with a task in every state."""
    db = Database.from_url(f"sqlite:///{tmp_path / 'data' / 'backstop.db'}")
    migrate.upgrade(db)
    one_of_each(db, utcnow())
    yield db
    db.dispose()


@pytest.fixture
def empty(server: str) -> Iterator[str]:
    """The URL of a new PostgreSQL database, not migrated."""
    with temporary_database(server, "cli_copy") as url:
        yield url


@pytest.fixture
def target(empty: str) -> str:
    """The URL of a new PostgreSQL database, migrated."""
    db = Database.from_url(empty)
    try:
        migrate.upgrade(db)
    finally:
        db.dispose()
    return empty


def counts(db: Database) -> dict[str, dict[str, int]]:
    with db.read() as conn:
        return count_rows(conn)


def test_copy_prints_the_counts_of_both_sides(
    tmp_path: Path, source: Database, target: str
) -> None:
    done = backstop(tmp_path / "data", "db", "copy", "--to", target)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["table", "state", "source", "target"]
    assert ["task", "running", "1", "1"] in [line.split() for line in lines]
    assert ["attempt", "failed", "3", "3"] in [line.split() for line in lines]
    assert ["schedule", "all", "2", "2"] in [line.split() for line in lines]
    assert lines[-1].endswith("every count matches")
    copied = Database.from_url(target)
    try:
        assert counts(copied) == counts(source)
    finally:
        copied.dispose()


def test_a_runner_at_work_is_refused(tmp_path: Path, source: Database, target: str) -> None:
    with source.write() as conn:
        enqueue(conn, NewTask(name="test.noop", queue="busy"))
        claim_due(conn, "w1", 1, lease_seconds=600, queue="busy")

    line = assert_one_line_error(backstop(tmp_path / "data", "db", "copy", "--to", target))

    assert "1 running task(s)" in line
    assert "stop the API and the workers first" in line


def test_a_target_with_tasks_is_refused(tmp_path: Path, source: Database, target: str) -> None:
    assert backstop(tmp_path / "data", "db", "copy", "--to", target).returncode == 0

    line = assert_one_line_error(backstop(tmp_path / "data", "db", "copy", "--to", target))

    assert "already holds tasks" in line


def test_an_unmigrated_target_is_refused(tmp_path: Path, source: Database, empty: str) -> None:
    line = assert_one_line_error(backstop(tmp_path / "data", "db", "copy", "--to", empty))

    assert "BACKSTOP_DATABASE_URL=<url> backstop db upgrade" in line


def test_the_source_itself_is_refused(tmp_path: Path, target: str) -> None:
    done = backstop(tmp_path / "data", "db", "copy", "--to", target, BACKSTOP_DATABASE_URL=target)

    assert "is the source database itself" in assert_one_line_error(done)


@pytest.mark.parametrize(
    ("url", "named", "status"),
    [
        ("sqlite:///elsewhere.db", "copy into PostgreSQL", 2),
        ("postgresql+psycopg2://postgres@127.0.0.1/x", "postgresql+psycopg://", 1),
    ],
    ids=["sqlite", "psycopg2"],
)
def test_a_target_that_is_not_postgresql_through_psycopg_is_refused(
    tmp_path: Path, source: Database, url: str, named: str, status: int
) -> None:
    done = backstop(tmp_path / "data", "db", "copy", "--to", url)

    assert named in assert_one_line_error(done)
    assert done.returncode == status
