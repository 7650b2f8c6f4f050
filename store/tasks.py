"""Enqueueing, reading and listing tasks."""

from __future__ import annotations

import base64
import binascii
import json
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Row

from store import dependencies
from store.changes import notify
from store.driver import Convert, Driver, bind_processor
from store.errors import IdempotencyConflict, InvalidCursor, TaskNotFound
from store.jsonvalues import escaped_text
from store.models import (
    CLAIMABLE_WHERE,
    TERMINAL,
    TERMINAL_WHERE,
    UNIQUE_ACTIVE_WHERE,
    Task,
    TaskStatus,
    task_table,
)
from store.timeutil import UnreadableTime, utcnow

t = task_table


@dataclass(frozen=True, slots=True)
class NewTask:
    """What a caller asks to run; the store adds the id, times and state."""

    name: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 5
    scheduled_at: datetime | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    trace_context: str | None = None
    unique_key: str | None = None
    # Runs once each of these tasks succeeded (`store.dependencies`); none: at once.
    after: tuple[str, ...] = ()
    # The task whose success enqueues this one (a follow-up, `ctx.add_task`).
    parent_id: str | None = None
    id: str = field(default_factory=lambda: str(uuid4()))

    @property
    def keyed(self) -> bool:
        """Whether a key may make this enqueue return an existing task (`enqueue_once`)."""
        return self.idempotency_key is not None or self.unique_key is not None


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a task listing and the cursor of the next, if any."""

    items: list[Task]
    next_cursor: str | None


def to_task(row: Row[Any]) -> Task:
    """A `Task` from a result row of the task table."""
    return _task(dict(row._mapping))


def _task(values: dict[str, Any]) -> Task:
    # The values come from the database or from `_values`, so they are already right:
    # constructing skips validation, which costs ten times as much on the hot paths. A row
    # written by hand may hold a state outside the enum (its CHECK dropped): kept as the
    # stored text, which no runner acts on and `TaskOut` shows as unreadable.
    values["status"] = _STATES.get(values["status"], values["status"])
    return Task.model_construct(**values)


_STATES = {state.value: state for state in TaskStatus}


def _values(new: NewTask, now: datetime) -> dict[str, Any]:
    return {
        "id": new.id,
        "name": new.name,
        "status": TaskStatus.QUEUED,
        "queue": new.queue,
        "priority": new.priority,
        "args": new.args,
        "kwargs": new.kwargs,
        "attempts": 0,
        "max_attempts": new.max_attempts,
        "created_at": now,
        "scheduled_at": new.scheduled_at or now,
        "idempotency_key": new.idempotency_key,
        "request_hash": new.request_hash,
        "trace_context": new.trace_context,
        "unique_key": new.unique_key,
        "lease_token": 0,
        "expirations": 0,
        "parent_id": new.parent_id,
        "after": list(new.after) or None,
    }


# What a task stores for its links when it waits on no parent (`store.dependencies` sets
# them for one that does).
_UNLINKED = {"waiting_on": 0, "has_dependants": False}


# The columns an enqueue leaves empty.
_EMPTY = dict.fromkeys(
    (
        "started_at",
        "finished_at",
        "result",
        "last_error",
        "lease_owner",
        "lease_expires_at",
        "cancel_requested_at",
        "progress",
    )
)
_EMPTY.update(_UNLINKED)


def stored_task(new: NewTask, now: datetime) -> Task:
    """The task `new` is once enqueued at `now`, as a read of its row would return it (one
    enqueued `after=` others may wait on them, or have been cancelled: read it back)."""
    return _task({**_values(new, now), **_UNLINKED})


def stored_row(new: NewTask, now: datetime) -> dict[str, Any]:
    """`stored_task` as a mapping of every column: cheaper to build and to read than the
    model, for a caller that only reads it."""
    return {**_values(new, now), **_EMPTY}


# On SQLite the enqueue statements go to the driver's cursor (`store.driver.Driver`) as text,
# with rows of plain values: through `sa.insert(t)` each statement costs some 25 µs more (its
# execution set-up and generic parameter processing), about what SQLite takes to insert the
# row, and an enqueue is on the request path of every endpoint that adds a task. Each value
# goes through its column type's own bind processor, so the row holds exactly what
# `sa.insert(t)` would store (tests/store/test_tasks.py compares the two).
_COLUMNS = (
    "id",
    "name",
    "status",
    "queue",
    "priority",
    "args",
    "kwargs",
    "attempts",
    "max_attempts",
    "created_at",
    "scheduled_at",
    "idempotency_key",
    "request_hash",
    "trace_context",
    "unique_key",
    "lease_token",
    "expirations",
)
_SQLITE_INSERT = (
    f"INSERT INTO task ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
)
# SQLite takes an upsert clause per key; a partial index's only with the index's own WHERE.
_SQLITE_IDEMPOTENT = "ON CONFLICT (idempotency_key) DO NOTHING"
_SQLITE_UNIQUE = f"ON CONFLICT (unique_key) WHERE {UNIQUE_ACTIVE_WHERE} DO NOTHING"

_Processors = list[tuple[int, Convert]]
_processors: weakref.WeakKeyDictionary[Dialect, _Processors] = weakref.WeakKeyDictionary()


def _bind_processors(dialect: Dialect) -> _Processors:
    """The positions in `_COLUMNS` whose type converts values for the driver, with the
    conversions (SQLAlchemy's own: JSON text, and naive UTC text for the times). Cached:
    finding them cost as much as converting a row."""
    found = _processors.get(dialect)
    if found is None:
        found = _processors[dialect] = [
            (position, process)
            for position, name in enumerate(_COLUMNS)
            if (process := bind_processor(t.c[name], dialect)) is not None
        ]
    return found


def _driver_row(sql: str, values: dict[str, Any], processors: _Processors) -> tuple[Any, ...]:
    row = [values[name] for name in _COLUMNS]
    try:
        for position, process in processors:
            row[position] = process(row[position])
    except Exception as error:  # what SQLAlchemy raises for a value it cannot convert
        raise sa.exc.StatementError(str(error), sql, values, error) from error
    return tuple(row)


def _due_now(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Wake listening runners at commit for the queues of the rows that are due at once (a
    delayed task is found by the polls)."""
    notify(conn, {row["queue"] for row in rows if row["scheduled_at"] <= row["created_at"]})


def _insert(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert `rows` (made by `_values`) in one statement; those linked to others (`after=`,
    or a parent) in one more (`store.dependencies`), after the rest: they may name them."""
    linked = [values for values in rows if values["after"] or values["parent_id"]]
    if linked:
        rows = [values for values in rows if not (values["after"] or values["parent_id"])]
    if rows:
        _insert_plain(conn, rows)
    if linked:
        dependencies.insert_linked(conn, linked)
    for values in rows:
        values.update(_UNLINKED)


def _insert_plain(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if conn.dialect.name != "sqlite":
        conn.execute(sa.insert(t), rows)
        _due_now(conn, rows)
        return
    processors = _bind_processors(conn.dialect)
    sql = _SQLITE_INSERT
    Driver(conn).execute_many(sql, [_driver_row(sql, values, processors) for values in rows])


def _insert_or_ignore(values: dict[str, Any]) -> sa.Insert:
    """PostgreSQL's INSERT of `values` that does nothing when one of its keys is taken."""
    from sqlalchemy.dialects import postgresql

    insert = postgresql.insert(t)
    if values["unique_key"] is None:
        return insert.on_conflict_do_nothing(index_elements=["idempotency_key"])
    if values["idempotency_key"] is None:
        return insert.on_conflict_do_nothing(
            index_elements=["unique_key"], index_where=sa.text(UNIQUE_ACTIVE_WHERE)
        )
    # PostgreSQL takes one conflict target, and none names two indexes: without a target
    # every unique index is one (the random primary key's too, which never collides).
    return insert.on_conflict_do_nothing()


def _insert_once(conn: Connection, values: dict[str, Any]) -> bool:
    """Insert one row unless one of its keys is taken; whether it was inserted."""
    if values["after"] or values["parent_id"]:
        return _insert_linked_once(conn, values)
    values.update(_UNLINKED)
    if conn.dialect.name != "sqlite":
        # SQLAlchemy keeps an INSERT's rowcount only when asked to.
        options = {"preserve_rowcount": True}
        result = conn.execute(_insert_or_ignore(values), values, execution_options=options)
        if result.rowcount != 1:
            return False
        _due_now(conn, [values])
        return True
    clauses = [
        clause
        for key, clause in (("idempotency_key", _SQLITE_IDEMPOTENT), ("unique_key", _SQLITE_UNIQUE))
        if values[key] is not None
    ]
    sql = " ".join([_SQLITE_INSERT, *clauses])
    row = _driver_row(sql, values, _bind_processors(conn.dialect))
    return Driver(conn).execute_many(sql, [row]) == 1


def _insert_linked_once(conn: Connection, values: dict[str, Any]) -> bool:
    """`_insert_once` for a task with parents: a savepoint takes back the insert (and the
    parents' flags) when the key is taken, as ON CONFLICT cannot span the statements."""
    driver = Driver(conn)
    driver.execute("SAVEPOINT backstop_linked")
    try:
        dependencies.insert_linked(conn, [values])
    except sa.exc.IntegrityError:
        driver.execute("ROLLBACK TO SAVEPOINT backstop_linked")
        driver.execute("RELEASE SAVEPOINT backstop_linked")
        if not _key_taken(conn, values):
            raise  # not a key: a broken constraint is a bug, not a repeat
        return False
    driver.execute("RELEASE SAVEPOINT backstop_linked")
    return True


def _key_taken(conn: Connection, values: dict[str, Any]) -> bool:
    """Whether another task holds the idempotency key or the unique key of `values`."""
    if values["idempotency_key"] is not None:
        query = sa.select(t.c.id).where(t.c.idempotency_key == values["idempotency_key"])
        if conn.execute(query).first() is not None:
            return True
    return (
        values["unique_key"] is not None
        and unique_key_holder(conn, values["unique_key"]) is not None
    )


def enqueue(conn: Connection, new: NewTask, *, now: datetime | None = None) -> Task:
    """Insert one queued task; it is durable once the caller's transaction commits."""
    values = _values(new, now or utcnow())
    _insert(conn, [values])
    return _task(values)


def enqueue_many(
    conn: Connection, new: Sequence[NewTask], *, now: datetime | None = None
) -> list[Task]:
    """Insert several queued tasks in one statement."""
    if not new:
        return []
    stamp = now or utcnow()
    rows = [_values(item, stamp) for item in new]
    _insert(conn, rows)
    return [_task(values) for values in rows]


def enqueue_once(
    conn: Connection, new: NewTask, *, now: datetime | None = None
) -> tuple[Task, bool]:
    """Insert a task unless one of its keys is taken: `(task, True)` when this call stored
    it, `(the task that holds the key, False)` when nothing was stored.

    An idempotency key holds for as long as its task is kept: the same key with another
    `request_hash` raises `IdempotencyConflict`. A unique key holds while its task is queued,
    running or retrying: any task with that key gets the active one back, whatever its name
    and arguments. With both keys, the idempotency key is looked up first. Two callers racing
    with one key store one task: the unique indexes settle it inside the database.
    """
    if not new.keyed:
        raise ValueError("enqueue_once needs an idempotency key or a unique key")
    values = _values(new, now or utcnow())
    while not _insert_once(conn, values):
        if new.idempotency_key is not None:
            row = conn.execute(
                sa.select(t).where(t.c.idempotency_key == new.idempotency_key)
            ).first()
            if row is not None:
                existing = to_task(row)
                if existing.request_hash != new.request_hash:
                    raise IdempotencyConflict(new.idempotency_key, existing.id)
                return existing, False
        if new.unique_key is not None and (holder := unique_key_holder(conn, new.unique_key)):
            return holder, False
        # The task that held the key was pruned, or ended, between the two statements: again.
    return _task(values), True


def unique_key_holder(conn: Connection, key: str) -> Task | None:
    """The task that holds this unique key: the one queued, running or retrying with it."""
    # The index's own WHERE, word for word, for SQLite to read the partial index.
    query = sa.select(t).where(t.c.unique_key == key, sa.text(UNIQUE_ACTIVE_WHERE))
    row = conn.execute(query).first()
    return None if row is None else to_task(row)


def enqueue_batch(conn: Connection, items: Sequence[tuple[NewTask, datetime]]) -> None:
    """Insert tasks created at different moments (`(new, now)` pairs) in one statement;
    each one's row is `stored_task(new, now)`."""
    if items:
        _insert(conn, [_values(new, now) for new, now in items])


def enqueue_follow_ups(conn: Connection, items: Sequence[tuple[NewTask, datetime]]) -> None:
    """Insert the follow-ups of a success (`(new, now)` pairs, in the order they were
    added), in the transaction that records it. One whose `after=` names a task that does
    not exist is stored cancelled, saying so: the success must not fail for it."""
    if items:
        rows = [_values(new, now) for new, now in items]
        dependencies.insert_linked(conn, rows, missing_cancels=True)


def get_task(conn: Connection, task_id: str) -> Task:
    """The task with this id, or `TaskNotFound`."""
    row = conn.execute(sa.select(t).where(t.c.id == task_id)).first()
    if row is None:
        raise TaskNotFound(task_id)
    return to_task(row)


def get_tasks(conn: Connection, task_ids: Sequence[str]) -> list[Task]:
    """The tasks with these ids that exist, in no particular order."""
    if not task_ids:
        return []
    rows = conn.execute(sa.select(t).where(t.c.id.in_(list(task_ids)))).all()
    return [to_task(row) for row in rows]


def task_marks(conn: Connection, task_ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """What tells a change a client would see of each of these tasks (its state, attempt,
    lease and progress), by id; the ids of tasks that do not exist are left out. Cheaper
    than reading the tasks, for a watcher that reads only those whose mark moved."""
    marks: dict[str, tuple[Any, ...]] = {}
    ids = list(task_ids)
    for start in range(0, len(ids), _MARKS_CHUNK):
        query = sa.select(t.c.id, t.c.status, t.c.attempts, t.c.lease_token, t.c.progress).where(
            t.c.id.in_(ids[start : start + _MARKS_CHUNK])
        )
        for task_id, *mark in conn.execute(query):
            marks[task_id] = tuple(mark)
    return marks


# Ids per `IN (...)`, well under any driver's limit on parameters.
_MARKS_CHUNK = 500


def _encode_cursor(task: Task) -> str:
    created = task.created_at
    if isinstance(created, UnreadableTime):
        # A creation time written by hand that is not one: the cursor carries the value
        # stored, which the next page compares the column with as SQL orders them.
        raw = _UNREADABLE + json.dumps([*_tagged(created.stored), task.id])
    else:
        raw = f"{created.isoformat()}|{task.id}"
    data = raw.encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


# What opens a cursor that holds a stored value that is not a time, and how each kind of
# value is written in it (JSON has no bytes).
_UNREADABLE = "~"
_KINDS: dict[str, Callable[[Any], Any]] = {"blob": bytes.fromhex, "value": lambda value: value}


def _tagged(stored: Any) -> tuple[str, Any]:
    return ("blob", stored.hex()) if isinstance(stored, bytes) else ("value", stored)


def _compared(value: Any) -> Any:
    """What a column is compared with for a cursor's value (a time, the value stored in its
    place, an id). Text that is not UTF-8 (read with lone surrogates, which no driver takes)
    goes back as its bytes, cast to text as SQLite stored them, so that it sorts among texts,
    not blobs."""
    stored = value.stored if isinstance(value, UnreadableTime) else value
    if isinstance(stored, str) and escaped_text(stored) is not stored:
        raw = stored.encode("utf-8", "surrogateescape")
        return sa.cast(sa.literal(raw, sa.LargeBinary), sa.Text)
    return value


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded).decode("utf-8", "surrogatepass")
        if text.startswith(_UNREADABLE):
            kind, value, task_id = json.loads(text.removeprefix(_UNREADABLE))
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError("a cursor's stored value is text or a number")
            return UnreadableTime.of(_KINDS[kind](value)), str(task_id)
        created, task_id = text.split("|", 1)
        stamp = datetime.fromisoformat(created)
        if stamp.tzinfo is None:
            raise ValueError("a cursor's time has an offset")
        # In UTC, as the rows compare: an offset can push it past the years 1 to 9999.
        return stamp.astimezone(UTC), task_id
    except (ValueError, binascii.Error, OverflowError, KeyError, TypeError) as exc:
        raise InvalidCursor(cursor) from exc


def list_tasks(
    conn: Connection,
    *,
    status: TaskStatus | Sequence[TaskStatus] | None = None,
    name: str | None = None,
    queue: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> TaskPage:
    """Tasks newest first, filtered (`status`: one state or any of several), one page at a
    time (a keyset cursor: stable under inserts)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    query = sa.select(t).order_by(t.c.created_at.desc(), t.c.id.desc()).limit(limit + 1)
    if isinstance(status, str):  # a state's name (the test kit's `all(status="failed")`)
        status = TaskStatus(status)
    if isinstance(status, TaskStatus):
        query = query.where(t.c.status == status)
        if status in TERMINAL:
            # Implied by the line above, but SQLite uses the partial ix_task_finished_status
            # only when the query carries the index's own WHERE clause word for word.
            query = query.where(sa.text(TERMINAL_WHERE))
    elif status is not None:
        query = query.where(t.c.status.in_([state.value for state in status]))
    if name is not None:
        query = query.where(t.c.name == name)
    if queue is not None:
        query = query.where(t.c.queue == queue)
    if cursor is not None:
        stamp, after_id = _decode_cursor(cursor)
        created, task_id = _compared(stamp), _compared(after_id)
        query = query.where(
            sa.or_(
                t.c.created_at < created,
                sa.and_(t.c.created_at == created, t.c.id < task_id),
            )
        )
    try:
        items = [to_task(row) for row in conn.execute(query)]
    except sa.exc.DataError as error:  # PostgreSQL: a cursor's stored value it cannot compare
        if cursor is None:
            raise
        raise InvalidCursor(cursor) from error
    if len(items) <= limit:
        return TaskPage(items, None)
    items = items[:limit]
    return TaskPage(items, _encode_cursor(items[-1]))


def count_by_status(conn: Connection) -> dict[TaskStatus, int]:
    """How many tasks are in each state (every state present, zero or not)."""
    counts = dict.fromkeys(TaskStatus, 0)
    for status, count in conn.execute(sa.select(t.c.status, sa.func.count()).group_by(t.c.status)):
        if status in counts:  # not a state written by hand (see `_task`)
            counts[TaskStatus(status)] = count
    return counts


def next_due_at(conn: Connection) -> datetime | None:
    """When the earliest waiting (queued or retrying) task becomes due; None if none waits."""
    query = sa.select(sa.func.min(t.c.scheduled_at)).where(sa.text(CLAIMABLE_WHERE))
    stamp: datetime | None = conn.execute(query).scalar_one_or_none()
    # A due time written by hand that is not one: the polls find the task if a claim can.
    return None if isinstance(stamp, UnreadableTime) else stamp
