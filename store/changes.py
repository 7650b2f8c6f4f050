"""Telling runners that another connection committed work: NOTIFY on PostgreSQL, and
SQLite's stand-in for it.

On PostgreSQL every write that makes a task due, or asks a running one to stop, calls
`notify` or `notify_cancel` inside its own transaction: PostgreSQL delivers the signal at
commit (not at all on a rollback) to every connection that LISTENs, which is what a
`Listener` does for a runner. Every write that changes what a client sees of a task (its
state, its attempt, its progress) calls `notify_changed`, which a `Listener` on
`TASK_CHANNEL` hears for whoever waits on the task (`app.watch`). On SQLite these calls do
nothing.

SQLite has no NOTIFY. `PRAGMA data_version` changes whenever another connection (of this
process or any other) commits to the file. Reading it is a few microseconds and touches no
table, so a runner can look every couple of milliseconds (`ChangeFeed`) and claim as soon as
another process enqueues.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from store.engine import LINK_CHECKS, Database, connect_args

# Payload: a queue that may have a due task now.
CHANNEL = "backstop"
# Payload: the id of a running task that was asked to stop.
CANCEL_CHANNEL = "backstop_cancel"
# Payload: the ids of tasks whose state, attempt or progress changed, joined by commas.
TASK_CHANNEL = "backstop_task"
# Bytes a payload may hold (PostgreSQL's limit is 8000).
MAX_PAYLOAD = 7900
# How a listening connection names itself in pg_stat_activity, unless the URL names it.
LISTENER_NAME = "backstop-listener"
# The channel (with a random suffix) of the signal a listener sends itself to check that
# signals reach it, and how long it waits for it (seconds).
PROBE_CHANNEL = "backstop_probe"
PROBE_TIMEOUT = 3.0

_NOTIFY = sa.text(
    "SELECT pg_notify(c, p) FROM unnest(CAST(:channels AS text[]), CAST(:payloads AS text[]))"
    " AS n(c, p)"
)
_SENT = "backstop_notified"


def notify(conn: Connection, queues: Iterable[str]) -> None:
    """Tell listening runners, when this transaction commits, that tasks of these queues may
    be due. Nothing on SQLite."""
    _send(conn, CHANNEL, queues)


def notify_cancel(conn: Connection, task_ids: Iterable[str]) -> None:
    """Tell listening runners, when this transaction commits, that these running tasks were
    asked to stop. Nothing on SQLite."""
    _send(conn, CANCEL_CHANNEL, task_ids)


def notify_changed(conn: Connection, task_ids: Iterable[str]) -> None:
    """Tell listening watchers, when this transaction commits, that these tasks changed
    (their ids joined by commas, as few signals as fit PostgreSQL's 8000-byte payload: one
    signal per task cost a claim of 100 tasks several times what the claim itself took).
    Nothing on SQLite."""
    if conn.dialect.name != "postgresql":
        return
    payloads: list[str] = []
    size = MAX_PAYLOAD
    for task_id in sorted(set(task_ids)):
        if size + 1 + len(task_id) > MAX_PAYLOAD:
            payloads.append(task_id)
            size = len(task_id)
        else:
            payloads[-1] += "," + task_id
            size += 1 + len(task_id)
    _send(conn, TASK_CHANNEL, payloads)


def changed_ids(payload: str) -> list[str]:
    """The task ids of one `TASK_CHANNEL` signal."""
    return payload.split(",")


def _send(conn: Connection, channel: str, payloads: Iterable[str]) -> None:
    if conn.dialect.name != "postgresql":
        return
    wanted = {(channel, payload) for payload in payloads}
    # PostgreSQL delivers a signal sent twice in one transaction once; sending it once saves
    # the round trip (a cycle that schedules many retries of one queue sends one).
    # (Per savepoint too: one rolled back takes its signals with it.)
    transaction = conn.get_nested_transaction() or conn.get_transaction()
    if transaction is not None:
        sent: tuple[weakref.ref[Any], set[tuple[str, str]]] | None = conn.info.get(_SENT)
        if sent is None or sent[0]() is not transaction:
            sent = conn.info[_SENT] = (weakref.ref(transaction), set())
        wanted -= sent[1]
        sent[1].update(wanted)
    if not wanted:
        return
    ordered = sorted(wanted)
    conn.execute(
        _NOTIFY, {"channels": [c for c, _ in ordered], "payloads": [p for _, p in ordered]}
    )


@dataclass(frozen=True, slots=True)
class Notice:
    """One signal heard: its channel (`CHANNEL` or `CANCEL_CHANNEL`) and payload."""

    channel: str
    payload: str


class Listener:
    """A PostgreSQL connection of its own, in autocommit, that LISTENs on `channels` (the
    runner's two by default).

    Not thread-safe: one thread connects, waits on `fileno()` and calls `receive`. Any
    method may raise the driver's error when the connection is lost; `connect` again then.
    """

    def __init__(
        self,
        db: Database,
        *,
        connect_timeout: int = 5,
        channels: tuple[str, ...] = (CHANNEL, CANCEL_CHANNEL),
    ) -> None:
        if db.dialect != "postgresql":
            raise ValueError("LISTEN needs PostgreSQL")
        cargs, params = db.engine.dialect.create_connect_args(db.engine.url)
        params.setdefault("application_name", LISTENER_NAME)
        params.update(connect_args(db.engine))
        params.setdefault("connect_timeout", connect_timeout)
        params.update(LINK_CHECKS)
        self._cargs = cargs
        self._params = params
        self._channels = channels
        self._conn: Any = None
        self._early: list[Notice] = []

    def connect(self) -> None:
        """(Re)open the connection and LISTEN; signals sent before this are not heard."""
        import psycopg

        self.close()
        self._early = []
        conn = psycopg.connect(*self._cargs, **self._params, autocommit=True)
        try:
            for channel in self._channels:
                conn.execute(f"LISTEN {channel}")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def hears(self, timeout: float = PROBE_TIMEOUT) -> bool:
        """Whether a signal sent on another connection reaches this one within `timeout`.

        Not behind a pooler that hands each transaction to any server connection (PgBouncer
        in transaction mode): the LISTEN took on a server connection that went back to the
        pool, and the signals go there. A signal of Backstop's heard meanwhile is kept for
        `receive`.
        """
        import psycopg

        channel = f"{PROBE_CHANNEL}_{uuid.uuid4().hex[:12]}"
        self._conn.execute(f"LISTEN {channel}")
        probe = {**self._params, "application_name": f"{LISTENER_NAME}-probe"}
        with psycopg.connect(*self._cargs, **probe, autocommit=True) as sender:
            sender.execute("SELECT pg_notify(%s, 'probe')", (channel,))
        deadline = time.monotonic() + timeout
        heard = False
        while not heard and (left := deadline - time.monotonic()) > 0:
            for notice in self._conn.notifies(timeout=left, stop_after=1):
                if notice.channel == channel:
                    heard = True
                else:
                    self._early.append(Notice(notice.channel, notice.payload))
        self._conn.execute(f"UNLISTEN {channel}")
        return heard

    def fileno(self) -> int:
        """The socket to wait on: readable when a signal (or the connection's end) arrives."""
        fileno: int = self._conn.fileno()
        return fileno

    def receive(self) -> list[Notice]:
        """The signals that arrived, without waiting; raises when the connection is lost."""
        early, self._early = self._early, []
        return early + [Notice(n.channel, n.payload) for n in self._conn.notifies(timeout=0)]

    def close(self) -> None:
        """Close the connection, if open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


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
