"""The engine factory and the transactions every store function runs in.

On SQLite the pysqlite driver's own transaction handling is switched off and Backstop emits
`BEGIN` itself (SQLAlchemy's documented recipe): writes open with `BEGIN IMMEDIATE`, which
takes SQLite's write lock up front, so two writers queue on `busy_timeout` instead of one of
them failing with "database is locked" when it upgrades a read lock; reads stay `DEFERRED`
and, under WAL, never block or wait for a writer.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from store import jsonvalues
from store.errors import DatabaseFileGone, WriteTimeout
from store.health import WriteHealth, as_unavailable
from store.timeutil import UnreadableTime

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

_RLOCK = type(threading.RLock())
_BEGIN_MODE = "backstop_begin"
# A write's own bound on the wait for SQLite's lock, in ms (else the engine's busy timeout).
_BUSY_TIMEOUT = "backstop_busy_timeout_ms"
# The same bound set by the code running now, for a BEGIN it cannot pass options to: a
# caller's own Session begins its transaction itself (`store.joined`).
BEGIN_WAIT_MS: ContextVar[int | None] = ContextVar("backstop_begin_wait_ms", default=None)


def default_url(data_dir: str | Path) -> str:
    """The SQLite file Backstop uses when no database URL is set."""
    return f"sqlite:///{Path(data_dir) / 'backstop.db'}"


def masked_url(url: str) -> str:
    """`url` with its password as `***`, fit for a log line or an error."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        return "<a database URL that does not parse>"


def _enable_wal(cursor: Any, timeout_s: float) -> None:
    # Turning a new file to WAL takes an exclusive lock, and when two connections try at the
    # same moment SQLite answers "database is locked" at once instead of waiting on
    # busy_timeout (waiting could deadlock). WAL sticks to the file, so only the first
    # connections to a new file meet this: two processes starting on it together.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


# Pages the WAL may grow by before a commit copies them into the database file (SQLite's
# default is 1,000, 4 MiB). Each task touches a few pages, the same index pages over and
# over: with 10,000 a checkpoint copies each hot page once for many more commits, and pays
# its two fsyncs (synchronous=NORMAL) a tenth as often; the runner drained 20% more per
# second. The WAL file grows to about 40 MiB.
WAL_CHECKPOINT_PAGES = 10_000

# How long a writer polls for the lock in fine steps before it leaves the waiting to SQLite.
_QUICK_WAIT_S = 0.05


def _begin_immediate(raw: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """BEGIN IMMEDIATE, polling for the write lock every 50 to 500 µs at first.

    SQLite's busy handler sleeps 1, 2, 5, 10 ms and more between tries, so a transaction of
    another process that ends after 0.2 ms still costs this one a millisecond or more: two
    runner processes would spend their time asleep. A short poll hands the lock over about
    as fast as it frees; past `_QUICK_WAIT_S`, the busy handler waits out the rest.
    """
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + _QUICK_WAIT_S
        pause = 0.00005
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    break
            time.sleep(pause)
            pause = min(pause * 2, 0.0005)
    finally:
        raw.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    raw.execute("BEGIN IMMEDIATE")


@dataclass(frozen=True)
class PostgresOptions:
    """How Backstop connects to PostgreSQL (the `BACKSTOP_PG_*` settings)."""

    # The pool of each process: connections kept open, and how many more it may open at a
    # busy moment (closed again when returned).
    pool_size: int = 5
    max_overflow: int = 10
    # Seconds any one statement may run before the server cancels it; 0: no limit.
    statement_timeout: float = 0
    # Seconds to wait for a connection to open: an unreachable server fails a request in
    # this time instead of the kernel's minutes.
    connect_timeout: int = 5
    # False behind a pooler that hands each transaction to any server connection (PgBouncer
    # in transaction mode): the driver then never prepares statements on the server.
    prepared_statements: bool = True


# A link that dies without a word (a host cut off, a cable pulled) is noticed within about
# 25 s, idle or mid-statement, rather than at the kernel's default of two hours.
LINK_CHECKS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,
}

_connect_args: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()


def connect_args(engine: Engine) -> dict[str, Any]:
    """The driver's keyword arguments that `create_engine` gave `engine`'s connections on
    top of its URL (for a connection opened outside the pool, like the listener's)."""
    return dict(_connect_args.get(engine, {}))


def _read_any_timestamptz(dbapi_connection: Any, _record: Any) -> None:
    """Let this connection read every `timestamptz` PostgreSQL stores: `infinity`, or a year
    past 9999 or before 1 (a row written by hand), has no Python datetime, and psycopg would
    fail the whole read; it is read as an `UnreadableTime` holding the stored text."""
    dbapi_connection.adapters.register_loader("timestamptz", _lenient_timestamptz_loader())


@functools.cache
def _lenient_timestamptz_loader() -> type:
    # Imported here: psycopg is installed only with the `postgres` extra.
    import psycopg
    from psycopg.types.datetime import TimestamptzLoader

    class LenientTimestamptzLoader(TimestamptzLoader):
        def load(self, data: Any) -> Any:
            try:
                return super().load(data)
            except psycopg.DataError:
                return UnreadableTime.of(bytes(data).decode("utf-8", "replace"))

    return LenientTimestamptzLoader


def _postgres_engine(url: str, options: PostgresOptions, echo: bool) -> Engine:
    args: dict[str, Any] = {"connect_timeout": max(options.connect_timeout, 1), **LINK_CHECKS}
    if not options.prepared_statements:
        args["prepare_threshold"] = None
    engine = sa.create_engine(
        url,
        echo=echo,
        # A connection the server closed (it restarted, or an administrator ended it) is
        # replaced when taken from the pool, so no request pays for it.
        pool_pre_ping=True,
        pool_size=options.pool_size,
        max_overflow=options.max_overflow,
        connect_args=args,
    )
    _connect_args[engine] = args
    event.listen(engine, "connect", _read_any_timestamptz)
    timeout_ms = round(options.statement_timeout * 1000)
    if timeout_ms > 0:
        # A SET on each new connection rather than the startup packet's `options`, which
        # PgBouncer refuses ("unsupported startup parameter").
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            try:
                dbapi_connection.execute(f"SET statement_timeout = {timeout_ms}")
            finally:
                dbapi_connection.autocommit = autocommit

    return engine


def create_engine(
    url: str,
    *,
    synchronous: Synchronous = "NORMAL",
    busy_timeout_ms: int = 10_000,
    echo: bool = False,
    postgres: PostgresOptions | None = None,
) -> Engine:
    """An engine for `url`; on SQLite: WAL, `busy_timeout`, `synchronous`, explicit BEGINs;
    on PostgreSQL: the pool, timeouts and link checks of `postgres`."""
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ValueError(
            f"Backstop runs on SQLite or PostgreSQL, not {backend!r}:"
            " sqlite:///path/to/file.db or postgresql+psycopg://user@host/name"
        )
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ValueError(
                f"Backstop talks to PostgreSQL through psycopg 3, not {parsed.get_driver_name()!r}:"
                " write the URL as postgresql+psycopg://user@host/name"
            )
        try:
            return _postgres_engine(url, postgres or PostgresOptions(), echo)
        except ImportError as error:
            raise ValueError(
                f"PostgreSQL needs psycopg ({error}): install backstop-tasks[postgres]"
            ) from error

    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        raise ValueError(f"Backstop needs a SQLite file, not {url!r}: other processes must see it")

    engine = sa.create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
        # A row written by hand may hold text that is not JSON, or not UTF-8: read, not
        # raised on (see `store.jsonvalues`). PostgreSQL checks both as it stores them.
        json_deserializer=jsonvalues.loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level: the "begin" hook below decides how to BEGIN.
        dbapi_connection.isolation_level = None
        dbapi_connection.text_factory = jsonvalues.decode_text
        cursor = dbapi_connection.cursor()
        _enable_wal(cursor, busy_timeout_ms / 1000)
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        mode = options.get(_BEGIN_MODE, "IMMEDIATE")
        # Straight to the driver: through SQLAlchemy's execution path a BEGIN cost ten
        # times what SQLite takes to run it, on every transaction.
        raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        try:
            if mode == "IMMEDIATE":
                bound = options.get(_BUSY_TIMEOUT, BEGIN_WAIT_MS.get())
                _begin_immediate(raw, busy_timeout_ms if bound is None else bound)
            else:
                raw.execute(f"BEGIN {mode}")
        except sqlite3.Error as exc:  # as SQLAlchemy would have raised it
            raise sa.exc.DBAPIError.instance(f"BEGIN {mode}", None, exc, sqlite3.Error) from exc

    return engine


class Database:
    """An engine plus the two kinds of transaction the store runs in."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite has one writer at a time. Threads of this process queue for it on this lock,
        # which hands over in microseconds; left to SQLite's busy handler they would sleep
        # and poll (1 ms, 2 ms, 5 ms, ...) and throughput would collapse under concurrency.
        self._write_lock = threading.RLock() if self.dialect == "sqlite" else nullcontext()
        self._copy_rest = False
        path = engine.url.database if self.dialect == "sqlite" else None
        self.health = WriteHealth(Path(path).resolve() if path else None)
        if self.health.file is not None:
            event.listen(engine, "connect", self._opened)

    def _opened(self, _dbapi_connection: Any, _record: Any) -> None:
        if self.health.file is not None:
            self.health.file.opened()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Database:
        """A database for `url`, with `create_engine`'s options."""
        return cls(create_engine(url, **options))

    @contextmanager
    def write(
        self, conn: Connection | None = None, *, wait: float | None = None
    ) -> Iterator[Connection]:
        """A write transaction (`BEGIN IMMEDIATE` on SQLite), committed on a clean exit; on a
        connection of its own, or on `conn` (which stays open afterwards).

        With `wait` (seconds, on a connection of its own), the wait for the write lock is
        bounded by it rather than by the busy timeout (on PostgreSQL: every lock the
        transaction waits for, `lock_timeout`). Each write tells `health` how it went;
        on SQLite, one that would land in a file deleted or replaced since it was opened is
        rolled back (`DatabaseFileGone`).
        """
        file = self.health.file
        try:
            if file is not None and file.gone is not None:
                file.check()  # gone before: no need to begin
            with self._turn(wait):
                if conn is not None:
                    with conn.begin():
                        yield conn
                        if file is not None:
                            file.check()
                    self._after_commit(conn)
                else:
                    with self.engine.connect() as own:
                        if wait is not None:
                            own.execution_options(**{_BUSY_TIMEOUT: int(wait * 1000)})
                        with own.begin():
                            if wait is not None and self.dialect == "postgresql":
                                # PostgreSQL's counterpart of the busy timeout: a row or
                                # table lock waited for longer fails the statement.
                                own.exec_driver_sql(f"SET LOCAL lock_timeout = {int(wait * 1000)}")
                            yield own
                            if file is not None:
                                file.check()
                        self._after_commit(own)
        except BaseException as error:
            unavailable = as_unavailable(error)
            # A file gone is a problem of its own, said once (`store.health.FileIdentity`).
            if unavailable is not None and not isinstance(unavailable, DatabaseFileGone):
                self.health.failed(unavailable.reason)
            raise
        self.health.succeeded()

    @contextmanager
    def _turn(self, wait: float | None) -> Iterator[None]:
        """This process's turn to write (SQLite), waiting at most `wait` seconds for it."""
        lock = self._write_lock
        if not isinstance(lock, _RLOCK):
            yield
            return
        if not lock.acquire(timeout=-1 if wait is None else wait):
            raise WriteTimeout(wait or 0.0, "another write of this process holds the turn")
        try:
            yield
        finally:
            lock.release()

    def copy_rest_of_wal(self) -> None:
        """Have the next write of this process, once committed, copy what is left of the WAL
        into the database file (see `store.checkpoints`). In the writer's own turn: a thread
        that waited for a turn could wait long behind writers that commit back to back."""
        self._copy_rest = self.dialect == "sqlite"

    def _after_commit(self, conn: Connection) -> None:
        if not self._copy_rest:
            return
        self._copy_rest = False
        raw: Any = conn.connection.driver_connection
        # PASSIVE: it never waits. What was committed stays so if the copy fails.
        with suppress(sqlite3.Error):
            raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (deferred on SQLite: it never waits for a writer)."""
        with self.engine.connect() as conn:
            conn.execution_options(**{_BEGIN_MODE: "DEFERRED"})
            with conn.begin():
                yield conn

    def ensure_directory(self) -> None:
        """Create the folder of a SQLite file (the file itself appears on first connect)."""
        database = self.engine.url.database
        if self.dialect == "sqlite" and database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


# Seconds a kept PostgreSQL connection may sit idle before its next use checks it first.
IDLE_CHECK = 1.0


class KeptConnection:
    """A single writer thread's connection, kept from one write transaction to the next.

    Both of the process's writer threads hold one: the enqueue writer (`store.commits`) and
    the runner's database thread (`app.runner.dbthread`). Checking a connection out of the
    pool and wrapping it anew costs as much as a small transaction's statements. Use it from
    its one thread only.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Connection | None = None
        self._used = 0.0
        # Only a server can restart under a kept connection; a SQLite file cannot.
        self._idle_check = IDLE_CHECK if db.dialect == "postgresql" else float("inf")

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on the kept connection; after a failure the next one opens a
        new connection (the failure may have been the connection's)."""
        now = time.monotonic()
        if self._conn is not None and now - self._used > self._idle_check:
            # Idle a while: the server may have restarted meanwhile. Back to the pool, whose
            # checkout pings it, rather than failing the next write on a dead connection.
            self.close()
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self.db.engine.connect()
        self._used = now
        try:
            with self.db.write(self._conn) as conn:
                yield conn
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection (a broken one may fail to close: that is ignored)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.close()


@functools.lru_cache(maxsize=64)
def _place(url: str) -> tuple[str, ...]:
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return (backend, str(Path(parsed.database or "").resolve()))
    return (backend, parsed.host or "", str(parsed.port or ""), parsed.database or "")


def same_database(a: sa.URL, b: sa.URL) -> bool:
    """Whether two URLs name one database (drivers, users and passwords aside)."""
    return _place(a.render_as_string(hide_password=True)) == _place(
        b.render_as_string(hide_password=True)
    )


def create_database(server_url: str, name: str) -> str:
    """Create the PostgreSQL database `name` on the server `server_url` names; its URL."""
    url = sa.make_url(server_url)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


@contextmanager
def temporary_database(server_url: str, prefix: str = "backstop") -> Iterator[str]:
    """A new PostgreSQL database on the server `server_url` names, named `prefix_<random>`;
    its URL while the block runs, dropped after it."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    url = create_database(server_url, name)
    try:
        yield url
    finally:
        drop_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop the PostgreSQL database `name`, closing whatever connections it still has."""
    admin = sa.create_engine(sa.make_url(server_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
