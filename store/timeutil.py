"""UTC timestamps that survive SQLite's lack of time zones, and stored times that are not
times at all."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """The current time, aware and in UTC."""
    return datetime.now(UTC)


class UnreadableTime(datetime):
    """A stored time that is not one: a row written by hand (`'garbage'`, `''`, a number,
    `'2026-13-45'` on SQLite; `'infinity'` or a year past 9999 on PostgreSQL).

    Nothing stored may make a read fail, so the read goes on with this in the value's place:
    the Unix epoch, so that code that orders or subtracts times keeps working, and `stored`,
    what the column held, for whoever shows it (the API shows null and the stored text under
    `unreadable`). Written back through `UTCDateTime` it is that stored value again, so a
    statement that finds a row by it (an attempt by its task's creation time) still does
    (but for text that is not UTF-8: see `_bindable`). Arithmetic on it gives a plain
    datetime.
    """

    stored: Any = None

    @classmethod
    def of(cls, stored: Any) -> UnreadableTime:
        made = cls(1970, 1, 1, tzinfo=UTC)
        made.stored = stored
        return made

    def __add__(self, other: Any) -> Any:
        return _plain(self) + other

    __radd__ = __add__

    def __sub__(self, other: Any) -> Any:
        return _plain(self) - other

    def __repr__(self) -> str:
        return f"UnreadableTime.of({self.stored!r})"


def _plain(stamp: datetime) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) if isinstance(stamp, UnreadableTime) else stamp


def _bindable(stored: Any) -> Any:
    # Text SQLite held that is not UTF-8 was read with lone surrogates, which no driver
    # takes: its bytes go back instead (a blob, equal to no text: a statement that finds
    # rows by it finds none, where it would otherwise fail).
    if isinstance(stored, str) and not stored.isascii():
        try:
            stored.encode("utf-8")
        except UnicodeEncodeError:
            return stored.encode("utf-8", "surrogateescape")
    return stored


def stored_text(value: Any) -> str:
    """An unreadable stored value as text (bytes decoded, lone surrogates kept for the
    caller to escape)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return "NULL" if value is None else str(value)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime in Python; naive UTC on SQLite, `timestamptz` elsewhere.

    SQLite stores the text `YYYY-MM-DD HH:MM:SS.ffffff`, which sorts like the instant it names
    only because every value is converted to UTC first; naive datetimes are refused so that a
    local time can never slip in. A stored value that is not a time is read as an
    `UnreadableTime`, never raised on.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"expected an aware datetime, got {value!r}")
        utc: datetime = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        inner = super().bind_processor(dialect)

        def process(value: Any) -> Any:
            # Past the dialect's own conversion, which takes only datetimes.
            if isinstance(value, UnreadableTime):
                return _bindable(value.stored)
            return inner(value) if inner is not None else value

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None or isinstance(value, UnreadableTime):
            return value
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Callable[[Any], Any] | None:
        inner = super().result_processor(dialect, coltype)

        def process(value: Any) -> Any:
            try:
                return inner(value) if inner is not None else value
            except (ValueError, TypeError, OverflowError):
                return UnreadableTime.of(value)

        return process
