"""WAL checkpoints apart from the commits: copied, and the WAL started over."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from store.checkpoints import WalCheckpoints
from store.engine import Database
from store.tasks import NewTask, enqueue_many
from tests.support.wal import frames, salt

pytestmark = pytest.mark.sqlite_only(reason="WAL checkpoints: PostgreSQL has no WAL file to copy")


def _commit(db: Database, count: int = 50) -> None:
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t", args=["x" * 200]) for _ in range(count)])


@pytest.fixture
def checkpoints(db: Database) -> Iterator[WalCheckpoints]:
    made = WalCheckpoints(db)
    yield made
    made.close()


def test_nothing_to_do_without_a_commit_since_the_last_run(
    db: Database, checkpoints: WalCheckpoints
) -> None:
    _commit(db)
    assert checkpoints.run()
    assert not checkpoints.run()
    _commit(db)
    assert checkpoints.run()


def test_after_a_run_the_next_commit_starts_the_wal_over(
    db: Database, checkpoints: WalCheckpoints
) -> None:
    _commit(db)
    one = frames(db)
    _commit(db)
    assert frames(db) > one  # no checkpoint: the WAL holds both commits
    wal = salt(db)
    checkpoints.run()
    _commit(db)
    assert salt(db) != wal  # the WAL started over


def test_what_is_committed_during_the_copy_is_copied_by_the_next_write(
    db: Database, checkpoints: WalCheckpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under load a commit lands while the copy runs; SQLite starts the WAL over only when
    # all of it was copied.
    _commit(db)
    pragma = checkpoints._pragma

    def landing(sql: str) -> tuple[int, ...]:
        answer = pragma(sql)
        if "wal_checkpoint" in sql:
            _commit(db)
        return answer

    monkeypatch.setattr(checkpoints, "_pragma", landing)
    checkpoints.run()
    monkeypatch.undo()
    wal = salt(db)
    _commit(db)  # no start over (not all copied); copies the rest once committed
    assert salt(db) == wal
    _commit(db)
    assert salt(db) != wal


def test_a_failed_copy_after_a_commit_does_not_fail_the_write(db: Database) -> None:
    class Broken:
        def execute(self, _sql: str) -> None:
            raise sqlite3.OperationalError("disk I/O error")

    class Conn:
        class connection:
            driver_connection = Broken()

    db.copy_rest_of_wal()
    db._after_commit(Conn())  # type: ignore[arg-type]
    assert not db._copy_rest  # and the next write is not asked again


def test_what_a_reader_still_needs_is_copied_by_the_next_run(
    db: Database, checkpoints: WalCheckpoints
) -> None:
    _commit(db)
    wal = salt(db)
    reader = sqlite3.connect(str(db.engine.url.database), isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM task").fetchone()  # holds this snapshot
        _commit(db)
        assert checkpoints.run()  # copies up to the reader's snapshot only
    finally:
        reader.close()
    # Nothing was committed since, and the run copies the rest all the same.
    assert checkpoints.run()
    assert not checkpoints.run()
    _commit(db)
    assert salt(db) != wal


def test_only_for_sqlite(db: Database) -> None:
    class Other:
        dialect = "postgresql"

    with pytest.raises(ValueError, match="SQLite"):
        WalCheckpoints(Other())  # type: ignore[arg-type]
