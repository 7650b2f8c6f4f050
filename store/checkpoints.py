"""Copying the WAL into the database file, apart from the commits.

By default the commit that takes the WAL past `wal_autocheckpoint` pages copies it into the
database file before it returns: 28-36 ms here, once every few seconds under load, and every
enqueue of the process waits behind it. A PASSIVE checkpoint from a connection of its own
makes the same copy without the write lock, so that commits go on while it runs.

But SQLite starts the WAL over only at a write that begins when the whole WAL is copied and
no reader is still in it, and under load a commit always lands while the copy runs: the WAL
would grow to the `wal_autocheckpoint` length all the same, and a commit would checkpoint
there. So a second, RESTART checkpoint follows with this process's writers held: it copies
what was committed meanwhile (a few milliseconds of commits), holding SQLite's write lock
against other processes, and waits a moment for readers to leave the WAL; the next write
then starts the WAL over.
"""

from __future__ import annotations

import sqlite3

from store.engine import Database

# How long the second checkpoint waits for another process's writer or a reader, in ms;
# past that it gives up, and the next call tries again.
RESTART_WAIT_MS = 20


class WalCheckpoints:
    """A connection that checkpoints a SQLite file's WAL when other connections committed."""

    def __init__(self, db: Database) -> None:
        if db.dialect != "sqlite":
            raise ValueError("WAL checkpoints are SQLite's")
        path = db.engine.url.database
        assert path, "create_engine accepts only a SQLite file"
        self.db = db
        with db.engine.connect() as conn:
            synchronous = int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
        # Its own connection (not one of the pool's), syncing as the engine's do.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute(f"PRAGMA busy_timeout={RESTART_WAIT_MS}")
        self._version = -1  # whatever was committed before it opened is to be copied too

    def _pragma(self, sql: str) -> tuple[int, ...]:
        row: tuple[int, ...] = self._conn.execute(sql).fetchone()
        return row

    def run(self) -> bool:
        """Copy the WAL into the database file if anything was committed since the last
        call; False when nothing was. What a reader or a writer kept it from copying is
        left to the next call."""
        version = self._pragma("PRAGMA data_version")[0]
        if version == self._version:
            return False
        self._pragma("PRAGMA wal_checkpoint(PASSIVE)")
        with self.db.writers_held():
            busy, logged, copied = self._pragma("PRAGMA wal_checkpoint(RESTART)")
            # Commits from here on move data_version again; -1 makes the next call try
            # again when this one could not finish.
            done = busy == 0 and copied == logged
            self._version = self._pragma("PRAGMA data_version")[0] if done else -1
        return True

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
