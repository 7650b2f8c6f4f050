"""Statements sent straight to the database driver, for the hot paths.

SQLAlchemy's execution path (the compiled-statement cache, parameter and result processing,
events) costs some 40 µs a statement, more than SQLite takes to run one. The few statements
sent thousands of times a second (the enqueue on SQLite; the runner's claim, attempt rows
and outcome of a success) therefore go to the DBAPI cursor of the same connection, inside
the same transaction (begun first if there is none, as SQLAlchemy would), in the driver's
own parameter style. They are not seen by SQLAlchemy's events (nor logged by `echo`); their
errors come out as SQLAlchemy's all the same. Values are written through the column
types' own bind processors (`bind_processor`: `store.timeutil.UTCDateTime`, SQLAlchemy's
JSON), so the stored bytes are what the SQLAlchemy path stores; tests compare the two.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from store import jsonvalues
from store.models import task_table
from store.timeutil import UnreadableTime

Convert = Callable[[Any], Any]
_processors: weakref.WeakKeyDictionary[Dialect, dict[sa.Column[Any], Convert | None]] = (
    weakref.WeakKeyDictionary()
)


def bind_processor(column: sa.Column[Any], dialect: Dialect) -> Convert | None:
    """How `column`'s type turns a value into what the driver takes on `dialect` (None: as
    it is). Cached: looking it up costs more than converting."""
    known = _processors.setdefault(dialect, {})
    if column not in known:
        known[column] = column.type.dialect_impl(dialect).bind_processor(dialect)
    return known[column]


def _identity(value: Any) -> Any:
    return value


class Driver:
    """The dialect-specific bits: parameter style, timestamps and JSON."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.sqlite = conn.dialect.name == "sqlite"
        if not self.sqlite and conn.dialect.driver != "psycopg":
            raise ValueError(
                "Backstop on PostgreSQL needs the psycopg (3) driver: a URL that starts "
                f"with postgresql+psycopg://, not {conn.dialect.name}+{conn.dialect.driver}"
            )
        dialect = conn.dialect
        self._errors: type[Exception] = dialect.loaded_dbapi.Error
        self._stamp = bind_processor(task_table.c.finished_at, dialect) or _identity
        self._json = bind_processor(task_table.c.result, dialect) or _identity

    def sql(self, statement: str) -> str:
        """`statement`, written with `?` placeholders, in the driver's parameter style."""
        return statement if self.sqlite else statement.replace("?", "%s")

    def stamp(self, value: datetime) -> Any:
        """An aware datetime as the column stores it (naive UTC text on SQLite); a naive one
        is refused, as `UTCDateTime` refuses it."""
        return self._stamp(value)

    def read_stamp(self, value: Any) -> datetime:
        """A stored timestamp as an aware UTC datetime; one that is not a time (a row written
        by hand) as an `UnreadableTime`."""
        try:
            if self.sqlite:
                return datetime.fromisoformat(value).replace(tzinfo=UTC)
            stamp: datetime = value
            return stamp.astimezone(UTC)
        except (ValueError, TypeError, AttributeError, OverflowError):
            return UnreadableTime.of(value)

    def json(self, value: Any) -> Any:
        """A JSON column's value as the driver takes it (None stays SQL NULL)."""
        return self._json(value)

    def read_json(self, value: Any) -> Any:
        """A stored JSON value as Python data."""
        if self.sqlite and isinstance(value, str | bytes):
            return jsonvalues.loads(value)
        return value

    def _cursor(self) -> Any:
        # A connection outside a transaction begins one first, as SQLAlchemy's own execution
        # does (autobegin): the driver's connection is in autocommit mode, so a statement
        # sent to it alone would be committed at once, beyond the caller's rollback.
        if not self._conn.in_transaction():
            self._conn.begin()
        return self._conn.connection.cursor()

    def execute(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement; the rows it returns (empty for a plain write)."""
        cursor = self._cursor()
        try:
            cursor.execute(self.sql(statement), params)
            return list(cursor.fetchall()) if cursor.description else []
        except self._errors as error:
            raise _as_sqlalchemy(error, statement, params, self._errors) from error
        finally:
            cursor.close()

    def execute_many(self, statement: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement for each parameter row; how many rows it changed in all."""
        cursor = self._cursor()
        try:
            cursor.executemany(self.sql(statement), rows)
            count: int = cursor.rowcount
            return count
        except self._errors as error:
            raise _as_sqlalchemy(error, statement, rows, self._errors) from error
        finally:
            cursor.close()


def _as_sqlalchemy(error: Exception, statement: str, params: Any, base: type) -> Exception:
    """The driver's error as SQLAlchemy raises it (`OperationalError`, `IntegrityError`...,
    the original in `.orig`), so that callers handle one family of exceptions whichever
    path ran the statement."""
    return sa.exc.DBAPIError.instance(statement, params, error, base)
