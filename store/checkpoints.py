"""Copying the WAL into the database file, apart from the commits.

By default the commit that takes the WAL past `wal_autocheckpoint` pages copies it into the
database file before it returns: 30-40 ms here, once every few seconds under load, and every
enqueue of the process waits behind it. A PASSIVE checkpoint from a connection of its own
makes the same copy without the write lock, so that commits go on while it runs.

But SQLite starts the WAL over only at a write that begins when the whole WAL is copied,
and under load a commit always lands while the copy runs: the WAL would grow to the
`wal_autocheckpoint` length all the same, and a commit would checkpoint there. So after the
copy, a second checkpoint copies what was committed meanwhile (a few milliseconds of
commits) with this process's writers held, and the next write starts the WAL over.
"""

from __future__ import annotations

from typing import Any

from store.engine import Database


class WalCheckpoints:
    """A connection that checkpoints a SQLite file's WAL when other connections committed."""

    def __init__(self, db: Database) -> None:
        if db.dialect != "sqlite":
            raise ValueError("WAL checkpoints are SQLite's")
        self.db = db
        # From the engine, so it syncs as its `synchronous` setting says.
        self._conn: Any = db.engine.raw_connection()
        self._version = -1  # whatever was committed before it opened is to be copied too

    def _pragma(self, sql: str) -> tuple[int, ...]:
        row: tuple[int, ...] = self._conn.driver_connection.execute(sql).fetchone()
        return row

    def run(self) -> bool:
        """Copy the WAL into the database file if anything was committed since the last
        call; False when nothing was. Pages a reader still needs are left to a later call.
        """
        version = self._pragma("PRAGMA data_version")[0]
        if version == self._version:
            return False
        self._pragma("PRAGMA wal_checkpoint(PASSIVE)")
        with self.db.writers_held():
            _busy, logged, copied = self._pragma("PRAGMA wal_checkpoint(PASSIVE)")
            # Commits from here on move data_version again; if a reader or another
            # process's writer kept part of the WAL, -1 makes the next call try again.
            self._version = self._pragma("PRAGMA data_version")[0] if copied == logged else -1
        return True

    def close(self) -> None:
        """Give the connection back."""
        self._conn.close()
