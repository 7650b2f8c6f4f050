"""Copying the WAL into the database file, apart from the commits.

By default the commit that takes the WAL past `wal_autocheckpoint` pages copies it into the
database file before it returns: 28-36 ms here, once every few seconds under load, and every
enqueue of the process waits behind it. A PASSIVE checkpoint from a connection of its own
makes the same copy without the write lock, so that commits go on while it runs.

But SQLite starts the WAL over only at a write that begins when the whole WAL is copied, and
under load a commit always lands while the copy runs: the WAL would grow to the
`wal_autocheckpoint` length all the same, and a commit would checkpoint there. So the next
write of this process, once committed, copies the rest (a few milliseconds of commits, about
a millisecond of work) before it lets the next writer in, and that one starts the WAL over.

Another process's writer can still land in between; with writers of two processes
committing back to back, SQLite finds no moment to start the WAL over, with or without
these checkpoints, until the load pauses.
"""

from __future__ import annotations

import sqlite3

from store.engine import Database


class WalCheckpoints:
    """A connection that checkpoints a SQLite file's WAL when other connections committed."""

    def __init__(self, db: Database) -> None:
        if db.dialect != "sqlite":
            raise ValueError("WAL checkpoints are SQLite's")
        path = db.engine.url.database
        assert path, "create_engine accepts only a SQLite file"
        self.db = db
        with db.read() as conn:
            synchronous = int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
        # Its own connection (not one of the pool's), syncing as the engine's do.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._version = -1  # whatever was committed before it opened is to be copied too

    def _pragma(self, sql: str) -> tuple[int, ...]:
        row: tuple[int, ...] = self._conn.execute(sql).fetchone()
        return row

    def run(self) -> bool:
        """Copy the WAL into the database file if anything was committed since the last
        call; False when nothing was. What a reader kept it from copying is left to the next
        call; what was committed meanwhile, to the next write of this process."""
        version = self._pragma("PRAGMA data_version")[0]
        if version == self._version:
            return False
        busy, logged, copied = self._pragma("PRAGMA wal_checkpoint(PASSIVE)")
        # -1: the next call tries again even if nothing is committed before it.
        self._version = version if busy == 0 and copied == logged else -1
        self.db.copy_rest_of_wal()
        return True

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
