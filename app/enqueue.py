"""Adding tasks from Python: what the `DurableTasks` dependency hands an endpoint."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction

from app.control import TaskControl
from app.errors import InvalidArguments, InvalidSchedule, SessionOnAnotherDatabase
from app.observability.metrics import TaskMetrics
from app.observability.tracing import enqueue_context
from app.tasks.registry import Registry
from store import jsonvalues
from store import tasks as store_tasks
from store.commits import GroupEnqueue
from store.dependencies import MAX_PARENTS
from store.engine import Database, same_database
from store.joined import Deadline, beginning, bounded
from store.models import Task
from store.tasks import NewTask
from store.timeutil import utcnow

if TYPE_CHECKING:  # SQLAlchemy's asyncio extension needs greenlet, which a sync team lacks
    from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)

TaskRef = Callable[..., Any] | str
MAX_KEY_LENGTH = 200
# A task id is a UUID (36 characters); `after=` names ids.
MAX_ID_LENGTH = 36

# Said when an argument is None in a call that joins a session: most likely the id of an
# object added to that session, which the database assigns only at the flush.
_FLUSH_HINT = (
    "; if None stands for the id of an object added to this session, flush the session "
    "first (session.flush(), or await session.flush() for an AsyncSession) so that the "
    "database assigns it"
)


class TaskClient(TaskControl):
    """Enqueues tasks durably: the row is committed before `add_task` returns (or, inside the
    caller's session, together with the caller's own data); and reads, awaits, cancels and
    retries them (`TaskControl`)."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        wake: Callable[[], None] | None = None,
        *,
        on_cancel: Callable[[str], None] | None = None,
        timeout: float | None = None,
        metrics: TaskMetrics | None = None,
    ):
        super().__init__(db, wake, on_cancel=on_cancel, timeout=timeout, metrics=metrics)
        self.registry = registry
        # Past `timeout` seconds an enqueue raises `WriteTimeout`, its task never committed.
        self._commits = GroupEnqueue(db, timeout=timeout)

    def add_task(
        self,
        fn: TaskRef,
        /,
        *args: Any,
        session: Session | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        unique_key: str | None = None,
        after: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Enqueue `fn(*args, **kwargs)` and return the task's id, like FastAPI's `add_task`.

        With `unique_key`, while a task with that key is queued, running or retrying, that
        task's id is returned and nothing is stored. The keyword names above are options,
        not arguments of `fn`; for a function with a parameter of one of those names, use
        `enqueue(fn, args, kwargs, ...)`.
        """
        new, now = self._prepare_in(
            session,
            fn,
            args,
            kwargs,
            delay,
            run_at,
            queue,
            priority,
            max_attempts,
            idempotency_key,
            unique_key=unique_key,
            after=after,
        )
        existing = self._store(new, now, session)
        return new.id if existing is None else existing.id

    def enqueue(
        self,
        fn: TaskRef,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        session: Session | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        unique_key: str | None = None,
        after: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> Task:
        """Check and enqueue one task; returns the task as stored (or the one that holds its
        key: the earlier one with the same idempotency key, the active one with the same
        unique key)."""
        task, _created = self.submit(
            fn,
            args,
            kwargs,
            session=session,
            delay=delay,
            run_at=run_at,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            unique_key=unique_key,
            after=after,
            now=now,
        )
        return task

    def submit(
        self,
        fn: TaskRef,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        session: Session | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        unique_key: str | None = None,
        after: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> tuple[Task, bool]:
        """`enqueue`, telling also whether this call stored the task (False: the task is
        an earlier request's with the same idempotency key, or the active one with the same
        unique key)."""
        new, now = self._prepare_in(
            session,
            fn,
            args,
            kwargs,
            delay,
            run_at,
            queue,
            priority,
            max_attempts,
            idempotency_key,
            now,
            unique_key=unique_key,
            after=after,
        )
        return self._answer(new, now, self._store(new, now, session), session)

    def _store(self, new: NewTask, now: datetime, session: Session | None) -> Task | None:
        """Commit `new` (or add it to the caller's session); None when it was stored, else
        the task that holds its key."""
        if session is not None:
            if hasattr(session, "sync_session"):
                raise TypeError(
                    "add_task takes a Session; with an AsyncSession, "
                    "await add_task_async(..., session=session)"
                )
            # Join the caller's transaction: the task commits or rolls back with their data,
            # and the local runner is woken only once it is committed. Its BEGIN, when it
            # begins here, and the insert wait for the database at most the enqueue timeout.
            deadline = self._deadline()
            with beginning(deadline):
                conn = session.connection()
            existing = self._insert(conn, new, now, deadline)
            if existing is None:
                _wake_after_commit(session, functools.partial(self._stored, new))
        else:
            existing = self._commits.enqueue(new, now)
            if existing is None:
                self._stored(new)
        log.debug("task %s (%s) %s", new.id, new.name, "enqueued" if existing is None else "exists")
        return existing

    async def add_task_async(
        self,
        fn: TaskRef,
        /,
        *args: Any,
        session: AsyncSession | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        unique_key: str | None = None,
        after: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """`add_task` for `async def` endpoints: the event loop never waits on the database,
        and concurrent calls commit together. Committed when the await returns; with
        `session` (an `AsyncSession`), when the caller commits it."""
        new, now = self._prepare_in(
            session,
            fn,
            args,
            kwargs,
            delay,
            run_at,
            queue,
            priority,
            max_attempts,
            idempotency_key,
            unique_key=unique_key,
            after=after,
        )
        existing = await self._store_async(new, now, session)
        return new.id if existing is None else existing.id

    async def submit_async(
        self,
        fn: TaskRef,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        session: AsyncSession | None = None,
        delay: float | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        unique_key: str | None = None,
        after: Sequence[str] | None = None,
        now: datetime | None = None,
    ) -> tuple[Task, bool]:
        """`submit` for callers on an event loop."""
        new, now = self._prepare_in(
            session,
            fn,
            args,
            kwargs,
            delay,
            run_at,
            queue,
            priority,
            max_attempts,
            idempotency_key,
            now,
            unique_key=unique_key,
            after=after,
        )
        return self._answer(new, now, await self._store_async(new, now, session), session)

    async def _store_async(
        self, new: NewTask, now: datetime, session: AsyncSession | None
    ) -> Task | None:
        """`store_async`, or into the caller's `AsyncSession`."""
        if session is None:
            return await self.store_async(new, now)
        if not hasattr(session, "sync_session"):
            raise TypeError("add_task_async takes an AsyncSession; with a Session, call add_task")
        # The same statements as the sync path, on the session's own connection and in its
        # transaction: `run_sync` runs them where the async driver can be awaited.
        conn = await session.connection()
        existing = await conn.run_sync(self._insert, new, now, self._deadline())
        if existing is None:
            _wake_after_commit(session.sync_session, functools.partial(self._stored, new))
        log.debug("task %s (%s) %s", new.id, new.name, "enqueued" if existing is None else "exists")
        return existing

    async def store_async(self, new: NewTask, now: datetime) -> Task | None:
        """Commit a task that `prepare` made: None once it is stored, or the task that holds
        its key (nothing is stored then)."""
        existing = await self._commits.enqueue_async(new, now)
        if existing is None:
            self._stored(new)
        log.debug("task %s (%s) %s", new.id, new.name, "enqueued" if existing is None else "exists")
        return existing

    def _stored(self, new: NewTask) -> None:
        """`new` is committed: count it, and wake the local runner."""
        self.metrics.enqueued(new.name, new.queue)
        self._wake()

    def _prepare_in(
        self,
        session: Session | AsyncSession | None,
        fn: TaskRef,
        args: Sequence[Any] | None,
        kwargs: dict[str, Any] | None,
        delay: float | None,
        run_at: datetime | None,
        queue: str | None,
        priority: int | None,
        max_attempts: int | None,
        idempotency_key: str | None,
        now: datetime | None = None,
        *,
        unique_key: str | None = None,
        after: Sequence[str] | None = None,
    ) -> tuple[NewTask, datetime]:
        """`prepare`, for a call that may join `session`: refused arguments then say that
        an id the database assigns exists only once the session is flushed."""
        try:
            return self.prepare(
                fn,
                args,
                kwargs,
                delay,
                run_at,
                queue,
                priority,
                max_attempts,
                idempotency_key,
                now,
                unique_key=unique_key,
                after=after,
            )
        except InvalidArguments as error:
            raise _flush_hint(error, session, args, kwargs)  # noqa: B904 (its own cause)

    def prepare(
        self,
        fn: TaskRef,
        args: Sequence[Any] | None,
        kwargs: dict[str, Any] | None,
        delay: float | None,
        run_at: datetime | None,
        queue: str | None,
        priority: int | None,
        max_attempts: int | None,
        idempotency_key: str | None,
        now: datetime | None = None,
        *,
        unique_key: str | None = None,
        after: Sequence[str] | None = None,
    ) -> tuple[NewTask, datetime]:
        """The row to store for this call, with everything checked; and the time it is."""
        return prepare_task(
            self.registry,
            fn,
            args,
            kwargs,
            delay,
            run_at,
            queue,
            priority,
            max_attempts,
            idempotency_key,
            now,
            unique_key=unique_key,
            after=after,
        )

    def _answer(
        self,
        new: NewTask,
        now: datetime,
        existing: Task | None,
        session: Session | AsyncSession | None,
    ) -> tuple[Task, bool]:
        """`submit`'s answer: the task stored now, or the earlier one with the same key. One
        stored `after=` others is read back (it may wait on them, or be cancelled already),
        unless it is in the caller's transaction, which no other connection sees yet."""
        if existing is None and new.after and session is None:
            return self.get(new.id), True
        return _answer(new, now, existing)

    def close(self) -> None:
        """Stop the enqueue writer thread (after what it was given to commit) and the
        watcher's."""
        self._commits.close()
        super().close()

    def _deadline(self) -> Deadline | None:
        return None if self._timeout is None else Deadline(self._timeout)

    def _insert(
        self, conn: Connection, new: NewTask, now: datetime, deadline: Deadline | None
    ) -> Task | None:
        """Store `new` on the caller's connection (in their transaction), waiting for a lock
        at most until `deadline` (`store.joined`: `WriteTimeout` past it, their transaction
        left as it was)."""
        if not same_database(conn.engine.url, self.db.engine.url):
            raise SessionOnAnotherDatabase(
                conn.engine.url.render_as_string(hide_password=True),
                self.db.engine.url.render_as_string(hide_password=True),
            )
        return bounded(conn, deadline, functools.partial(_insert, conn, new, now))


def _insert(conn: Connection, new: NewTask, now: datetime) -> Task | None:
    """`TaskClient._insert`'s statements."""
    if not new.keyed:
        store_tasks.enqueue_batch(conn, [(new, now)])
        return None
    task, created = store_tasks.enqueue_once(conn, new, now=now)
    return None if created else task


def prepare_task(
    registry: Registry,
    fn: TaskRef,
    args: Sequence[Any] | None,
    kwargs: dict[str, Any] | None,
    delay: float | None,
    run_at: datetime | None,
    queue: str | None,
    priority: int | None,
    max_attempts: int | None,
    idempotency_key: str | None,
    now: datetime | None = None,
    *,
    unique_key: str | None = None,
    after: Sequence[str] | None = None,
    parent_id: str | None = None,
) -> tuple[NewTask, datetime]:
    """The row to store for a call of `add_task` (or a follow-up's, `ctx.add_task`, with
    its `parent_id`), with everything checked against `registry`; and the time it is."""
    spec = registry.resolve(fn)
    checked_args, checked_kwargs = spec.check(list(args or []), dict(kwargs or {}))
    now = now or utcnow()
    if max_attempts is not None and max_attempts < 1:
        raise InvalidSchedule("max_attempts must be at least 1")
    for option, key in (("idempotency key", idempotency_key), ("unique key", unique_key)):
        if key is None:
            continue
        if not isinstance(key, str):  # a caller without type checks: refused, not stored
            raise InvalidSchedule(f"the {option} must be a string, not {type(key).__name__}")
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise InvalidSchedule(f"the {option} must be 1 to {MAX_KEY_LENGTH} characters")
    for option, text in (
        ("queue", queue),
        ("idempotency key", idempotency_key),
        ("unique key", unique_key),
    ):
        if text is not None and jsonvalues.problem(text) is not None:
            raise InvalidSchedule(f"the {option} holds a lone surrogate, which UTF-8 cannot encode")
        if text is not None and "\x00" in text:  # refused on both engines alike
            raise InvalidSchedule(
                f"the {option} holds a NUL character, which PostgreSQL cannot store"
            )
    new = NewTask(
        name=spec.name,
        args=checked_args,
        kwargs=checked_kwargs,
        queue=queue or spec.queue,
        priority=spec.priority if priority is None else priority,
        max_attempts=max_attempts or spec.max_attempts,
        scheduled_at=scheduled_at(delay, run_at, now),
        idempotency_key=idempotency_key,
        trace_context=enqueue_context(),
        unique_key=unique_key,
        after=parents(after),
        parent_id=parent_id,
    )
    if idempotency_key is not None:
        new = replace(new, request_hash=_fingerprint(new, delay, run_at))
    return new, now


def parents(after: Sequence[str] | None) -> tuple[str, ...]:
    """The ids `after=` names, checked: text of a task id's length, at most `MAX_PARENTS`
    of them; each once, in the order given."""
    if after is None:
        return ()
    if isinstance(after, str):
        raise InvalidSchedule("after must be a list of task ids, not one string")
    named = tuple(dict.fromkeys(after))
    if len(named) > MAX_PARENTS:
        raise InvalidSchedule(f"after names {len(named)} tasks; at most {MAX_PARENTS}")
    for task_id in named:
        if not isinstance(task_id, str) or not 1 <= len(task_id) <= MAX_ID_LENGTH:
            raise InvalidSchedule(f"after: {task_id!r} is not a task id")
        if jsonvalues.problem(task_id) is not None:
            raise InvalidSchedule("after: a task id holds a lone surrogate")
    return named


def _flush_hint(
    error: InvalidArguments,
    session: Session | AsyncSession | None,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
) -> InvalidArguments:
    """The error to raise for arguments refused in a call: with a session and a None among
    them, one that says an id the database assigns exists only once the session is flushed
    (the original as its cause); else the original."""
    given = [*(args or ()), *(kwargs or {}).values()]
    if session is None or not any(value is None for value in given):
        return error
    hinted = InvalidArguments(error.task, error.problem + _FLUSH_HINT)
    hinted.__cause__ = error
    return hinted


_WAKE_AFTER_COMMIT = "backstop.wake_after_commit"


def _wake_after_commit(session: Session, wake: Callable[[], None]) -> None:
    """Call `wake` once `session`'s transaction commits; not at all if it rolls back.

    The wakes wait in `session.info`; two listeners per session, whatever the number of
    tasks added, call them at the commit and forget them when the transaction ends.
    """
    waiting: set[Callable[[], None]] = session.info.setdefault(_WAKE_AFTER_COMMIT, set())
    waiting.add(wake)
    if not event.contains(session, "after_commit", _committed):
        event.listen(session, "after_commit", _committed)
        event.listen(session, "after_transaction_end", _ended)


def _committed(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: nothing is committed yet
    for wake in session.info.pop(_WAKE_AFTER_COMMIT, ()):
        wake()


def _ended(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction, committed or not
        session.info.pop(_WAKE_AFTER_COMMIT, None)


def _answer(new: NewTask, now: datetime, existing: Task | None) -> tuple[Task, bool]:
    """`submit`'s answer: the task stored now, or the one that holds its key."""
    if existing is None:
        return store_tasks.stored_task(new, now), True
    return existing, False


def _fingerprint(new: NewTask, delay: float | None, run_at: datetime | None) -> str:
    """A hash of what was asked for, so a retried request is told from a different one.

    The delay is hashed as asked, not the run time it gives: a retry comes later.
    """
    asked = {
        "name": new.name,
        "args": new.args,
        "kwargs": new.kwargs,
        "queue": new.queue,
        "priority": new.priority,
        "max_attempts": new.max_attempts,
        "delay": delay,
        "run_at": None if run_at is None else run_at.astimezone(UTC).isoformat(),
        **({"after": list(new.after)} if new.after else {}),
    }
    if new.unique_key is not None:  # only then: the hashes stored before it existed hold
        asked["unique_key"] = new.unique_key
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def scheduled_at(delay: float | None, run_at: datetime | None, now: datetime) -> datetime | None:
    """The run time that `delay` (seconds from now) or `run_at` (an aware time) asks for."""
    if delay is not None and run_at is not None:
        raise InvalidSchedule("give either delay or run_at, not both")
    if delay is not None:
        if not math.isfinite(delay):
            raise InvalidSchedule(f"delay must be a finite number of seconds, not {delay}")
        if delay < 0:
            raise InvalidSchedule("delay must not be negative")
        try:
            return now + timedelta(seconds=delay)
        except OverflowError:
            raise InvalidSchedule(f"a delay of {delay} seconds runs past the year 9999") from None
    if run_at is not None:
        if run_at.tzinfo is None:
            raise InvalidSchedule("run_at needs a time zone (for example 2030-01-01T09:00:00Z)")
        # In UTC, as the row reads back: the enqueue answer must not echo the caller's offset.
        try:
            return run_at.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:59:59-01:00 names an instant past year 9999
            raise InvalidSchedule(
                f"run_at {run_at.isoformat()} is outside the years 1 to 9999 in UTC"
            ) from None
    return None
