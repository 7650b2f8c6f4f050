"""WAL checkpoints apart from the commits: copied, and the WAL started over."""

from __future__ import annotations

import contextlib
import sqlite3
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store.checkpoints import WalCheckpoints
from store.engine import Database
from store.tasks import NewTask, enqueue_many


def _commit(db: Database, count: int = 50) -> None:
    with db.write() as conn:
        enqueue_many(conn, [NewTask(name="t", args=["x" * 200]) for _ in range(count)])


def _frames(db: Database) -> int:
    """The frames in the WAL: `mxFrame` of the WAL index header, at byte 16 of the -shm
    file (SQLite's documented WAL-index format, in native byte order)."""
    header = Path(f"{db.engine.url.database}-shm").read_bytes()[:20]
    frames: int = struct.unpack_from("=I", header, 16)[0]
    return frames


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
    one = _frames(db)
    _commit(db)
    assert _frames(db) > one  # no checkpoint: the WAL holds both commits
    checkpoints.run()
    _commit(db)
    assert _frames(db) <= one  # only this commit: the WAL started over


def test_a_commit_during_the_copy_is_copied_too_so_the_wal_still_starts_over(
    db: Database, checkpoints: WalCheckpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under load a commit lands while the first, lock-free copy runs; SQLite starts the WAL
    # over only when all of it was copied. The second copy runs with the writers held.
    _commit(db)
    one = _frames(db)
    pragma = checkpoints._pragma
    held_during: list[bool] = []

    def landing(sql: str) -> tuple[int, ...]:
        answer = pragma(sql)
        if "PASSIVE" in sql:
            _commit(db)  # from this thread: the writers are not held yet
        if "RESTART" in sql:
            held_during.append(not _free(db))
        return answer

    monkeypatch.setattr(checkpoints, "_pragma", landing)
    checkpoints.run()
    monkeypatch.undo()
    assert held_during == [True]
    _commit(db)
    assert _frames(db) <= one


def _free(db: Database) -> bool:
    """Whether another thread could take this process's write lock now."""
    free: list[bool] = []

    lock: Any = db._write_lock  # an RLock on SQLite

    def look() -> None:
        with contextlib.ExitStack() as stack:
            acquired = lock.acquire(blocking=False)
            if acquired:
                stack.callback(lock.release)
            free.append(acquired)

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    return free[0]


def test_what_a_reader_still_needs_is_copied_by_the_next_run(
    db: Database, checkpoints: WalCheckpoints
) -> None:
    _commit(db)
    one = _frames(db)
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
    assert _frames(db) <= one


def test_only_for_sqlite(db: Database) -> None:
    class Other:
        dialect = "postgresql"

    with pytest.raises(ValueError, match="SQLite"):
        WalCheckpoints(Other())  # type: ignore[arg-type]
