"""Noticing that another connection committed: SQLite's stand-in for LISTEN/NOTIFY.

`PRAGMA data_version` changes whenever another connection (of this process or any other)
commits to the file. Reading it is a few microseconds and touches no table, so a runner can
look every couple of milliseconds and claim as soon as another process enqueues.
"""

from __future__ import annotations

import sqlite3

from store.engine import Database


class ChangeFeed:
    """Tells whether anything was committed to a SQLite file since the last look."""

    def __init__(self, db: Database) -> None:
        path = db.engine.url.database
        if db.dialect != "sqlite" or not path:
            raise ValueError("a change feed needs a SQLite file")
        # A connection of its own: data_version only reports other connections' commits.
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._version = self._read()

    def _read(self) -> int:
        row = self._conn.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def changed(self) -> bool:
        """True if another connection committed since the last call."""
        version = self._read()
        if version == self._version:
            return False
        self._version = version
        return True

    def close(self) -> None:
        """Close the feed's connection."""
        self._conn.close()
