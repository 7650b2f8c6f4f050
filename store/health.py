"""Whether this process can write to its database: the outcome of its latest write, and
whether the SQLite file it opened is still the one at its path.

Every write transaction of a `store.engine.Database` reports here, whichever thread runs it
(the enqueue writer, the runner's database thread, a route), so `/readyz` knows that writes
fail without trying one itself on every poll (it tries one, `store.migrate.touch_version`,
only to see a failure end).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import sqlalchemy as sa

from store.errors import DatabaseFileGone, DatabaseUnavailable

log = logging.getLogger(__name__)

# Driver errors that say something about the request or the schema, not the database's
# health: a constraint, a bad statement or value. Every other driver error (locked, disk
# full, I/O, read-only, the server gone, not a database file) means it cannot write now.
_NOT_HEALTH = (
    sa.exc.IntegrityError,
    sa.exc.ProgrammingError,
    sa.exc.DataError,
    sa.exc.NotSupportedError,
)


def as_unavailable(error: BaseException) -> DatabaseUnavailable | None:
    """The `DatabaseUnavailable` that `error` amounts to, or None when it is not one."""
    if isinstance(error, DatabaseUnavailable):
        return error
    if isinstance(error, sa.exc.DBAPIError) and not isinstance(error, _NOT_HEALTH):
        if _unreachable(error):
            # The driver's message names the server's address: the class alone says enough.
            kind = type(error.orig or error).__name__
            return DatabaseUnavailable(
                f"the database cannot be reached right now ({kind}); try again shortly"
            )
        # The driver's own message, one line: SQLAlchemy's adds the statement and its
        # parameters, which are the caller's data.
        text = str(error.orig).strip().splitlines() if error.orig is not None else []
        message = text[0] if text else type(error).__name__
        return DatabaseUnavailable(f"the database cannot take writes: {message}")
    if isinstance(error, sa.exc.TimeoutError):  # no pooled connection came free
        return DatabaseUnavailable(f"the database cannot take writes: {error}")
    return None


def _unreachable(error: sa.exc.DBAPIError) -> bool:
    """Whether `error` is the server out of reach (down, restarting, cut off) or the
    connection lost under the statement, rather than the server refusing the write: a
    PostgreSQL error with no SQLSTATE (raised by the client) or of class 08 (connection
    exception) or 57P (operator intervention: shutdown, terminated backend)."""
    if error.connection_invalidated:
        return True
    if not hasattr(error.orig, "sqlstate"):  # not psycopg: SQLite says what it means
        return False
    state = getattr(error.orig, "sqlstate", None)
    return state is None or state.startswith(("08", "57P"))


class WriteHealth:
    """The outcome of the latest write transaction of the process, and the file check.

    A failure is logged once, when writes start failing, and the recovery once too.
    """

    def __init__(self, path: Path | None) -> None:
        self._lock = threading.Lock()
        self.failure: str | None = None
        self._worked = False
        self.file = FileIdentity(path) if path is not None else None

    @property
    def problem(self) -> str | None:
        """Why writes fail right now, or None: the file gone, or the latest write failed."""
        if self.file is not None and self.file.gone is not None:
            return self.file.gone
        return self.failure

    @property
    def gone(self) -> str | None:
        """Why this process takes no more work (its SQLite file is gone), or None."""
        return None if self.file is None else self.file.gone

    def succeeded(self) -> None:
        """A write committed."""
        self._worked = True
        if self.failure is None:
            return
        with self._lock:
            if self.failure is None:
                return
            self.failure = None
        log.warning("the database takes writes again")

    def failed(self, reason: str) -> None:
        """A write could not be made, for `reason`."""
        with self._lock:
            first = self.failure is None
            self.failure = reason
        # Before any write has worked (the start-up's migration), whoever asked says why, in
        # its own one line: this one is for a change in a running process.
        if first and self._worked:
            log.warning("writes to the database fail: %s", reason)


class FileIdentity:
    """The SQLite file this process opened: its device and inode, recorded at the first
    connection, against whatever is at its path now.

    A file deleted or replaced under an open connection keeps taking writes: its inode lives
    on until the last connection closes, and what lands there is lost to every other process
    and to the next start. Once that is seen, it stays seen: this process takes no more work.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gone: str | None = None
        self._identity: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def opened(self) -> None:
        """A connection was opened: remember which file the first one found."""
        if self._identity is None:
            with self._lock, contextlib.suppress(FileNotFoundError):  # not made yet
                if self._identity is None:
                    found = os.stat(self.path)
                    self._identity = (found.st_dev, found.st_ino)

    def check(self) -> None:
        """Raise `DatabaseFileGone` unless the file at the path is the one opened."""
        if self.gone is None:
            if self._identity is None:
                return
            try:
                found = os.stat(self.path)
            except FileNotFoundError:
                what = "was deleted"
            else:
                if (found.st_dev, found.st_ino) == self._identity:
                    return
                what = "was replaced by another file"
            with self._lock:
                if self.gone is None:
                    self.gone = (
                        f"the database file {self.path} {what} while this process had it open;"
                        " it takes no more work until it is restarted"
                    )
                    log.error("%s", self.gone)
        raise DatabaseFileGone(self.gone)
