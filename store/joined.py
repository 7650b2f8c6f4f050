"""Writes inside a caller's own transaction (`add_task(session=...)`), bounded in time.

Backstop's own writes wait at most `BACKSTOP_ENQUEUE_TIMEOUT` for the database; an enqueue
that joins a caller's transaction must not wait longer just because the transaction is
theirs. `bounded` lowers, for the statements it wraps, the wait for a lock on that
transaction's connection, and puts back what was there:

- SQLite: the connection's `busy_timeout` (and, through `BEGIN_WAIT_MS`, the wait of the
  `BEGIN IMMEDIATE` of a session on Backstop's own engine that begins there);
- PostgreSQL: `lock_timeout` and `statement_timeout`, `SET LOCAL` inside a savepoint, put
  back to their values when the statements are done.

Past the bound it raises `WriteTimeout`, as every other enqueue does, and the caller's
transaction stands as it was before: on SQLite a statement refused for the lock changes
nothing, on PostgreSQL the savepoint is rolled back (which a failed statement needs, else
the whole transaction is aborted). The caller's COMMIT is theirs and is not bounded here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.engine import BEGIN_WAIT_MS
from store.errors import WriteTimeout

T = TypeVar("T")

# PostgreSQL's SQLSTATEs for a wait cut short: lock_timeout, statement_timeout.
_PG_TIMED_OUT = frozenset({"55P03", "57014"})


class Deadline:
    """A bound of `seconds` from now, shared by the steps of one enqueue."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left_ms(self) -> int:
        """What is left of it, in whole milliseconds, at least 1 (0 would mean no bound
        to PostgreSQL, and no wait at all to SQLite, even for a free lock)."""
        return max(int((self._end - time.monotonic()) * 1000), 1)


@contextmanager
def beginning(deadline: Deadline | None) -> Iterator[None]:
    """Bound the `BEGIN IMMEDIATE` a session on Backstop's SQLite engine may run inside this
    block (when it procures its connection); `WriteTimeout` past it."""
    if deadline is None:
        yield
        return
    token = BEGIN_WAIT_MS.set(deadline.left_ms())
    try:
        yield
    except sa.exc.OperationalError as error:
        timeout = _timed_out(error, deadline)
        if timeout is None:
            raise
        raise timeout from error
    finally:
        BEGIN_WAIT_MS.reset(token)


def bounded(conn: Connection, deadline: Deadline | None, write: Callable[[], T]) -> T:
    """`write()`, run on `conn` in the caller's transaction, waiting at most what is left
    of `deadline` for a lock (no bound: None); its value, or `WriteTimeout`."""
    if deadline is None:
        return write()
    if conn.dialect.name == "sqlite":
        return _sqlite(conn, deadline, write)
    return _postgres(conn, deadline, write)


def _sqlite(conn: Connection, deadline: Deadline, write: Callable[[], T]) -> T:
    previous = int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one())
    conn.exec_driver_sql(f"PRAGMA busy_timeout = {deadline.left_ms()}")
    try:
        return write()
    except sa.exc.OperationalError as error:
        timeout = _timed_out(error, deadline)
        if timeout is None:
            raise
        raise timeout from error
    finally:
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {previous}")


_SET_LOCAL = sa.text(
    "SELECT set_config('lock_timeout', :lock, true), set_config('statement_timeout', :statement,"
    " true)"
)
# The same, in the statement that reads what they were (a target list is evaluated in order).
_SWAP = sa.text(
    "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'),"
    " set_config('lock_timeout', :lock, true), set_config('statement_timeout', :statement, true)"
)


def _postgres(conn: Connection, deadline: Deadline, write: Callable[[], T]) -> T:
    savepoint = conn.begin_nested()
    try:
        left = f"{deadline.left_ms()}ms"
        lock, statement, *_ = conn.execute(_SWAP, {"lock": left, "statement": left}).one()
        value = write()
    except BaseException as error:
        # Also undoes the SET LOCALs: they were made inside the savepoint.
        savepoint.rollback()
        timeout = _timed_out(error, deadline) if isinstance(error, sa.exc.DBAPIError) else None
        if timeout is None:
            raise
        raise timeout from error
    savepoint.commit()
    # Released, the savepoint's SET LOCALs last to the end of the caller's transaction.
    conn.execute(_SET_LOCAL, {"lock": lock, "statement": statement})
    return value


def _timed_out(error: sa.exc.DBAPIError, deadline: Deadline) -> WriteTimeout | None:
    """The `WriteTimeout` that `error` amounts to (a wait for a lock cut short), or None."""
    orig = error.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _PG_TIMED_OUT:
        cause = "a lock held by another transaction"
    elif isinstance(error, sa.exc.OperationalError) and "locked" in str(orig):
        cause = "another connection holds the write lock"
    else:
        return None
    return WriteTimeout(deadline.seconds, cause)
