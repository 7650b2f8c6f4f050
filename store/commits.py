"""Group commit: concurrent enqueues of one process share a transaction.

SQLite commits one transaction at a time, and each commit has a fixed cost (a WAL write,
and with `synchronous=FULL` an fsync). Every enqueue of the process, from a thread or from
an event loop, goes to one writer thread, which commits whatever queued while it committed
the previous group in one transaction: under load the cost is paid once per group rather
than once per request, and nobody waits for more than two commits.

Why a thread of its own rather than the first caller committing for the others: on a busy
core that caller still holds the CPU when it finds the writer's seat free, so it commits
alone before any other request thread has run, and groups stay at one or two tasks (1.8 on
average for a sync endpoint at 16 connections, against 4 with the writer thread). A caller
that hands its task over and blocks lets the other requests run and queue behind it.

A caller waits at most `timeout` seconds. Past it, its task is withdrawn: under the lock
that guards each job's state, the writer marks a group's jobs as committing just before the
COMMIT and leaves out (rolling back and starting again) any job withdrawn before that mark.
So a caller told that its write timed out can rely on its task never being committed; one
whose task is already being committed waits for that commit's outcome, which is quick (the
transaction has its lock and has run its statements).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from datetime import datetime

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from store.engine import Database, KeptConnection
from store.errors import WriteTimeout
from store.health import as_unavailable
from store.models import Task
from store.tasks import NewTask, enqueue_batch, enqueue_once

# A job's states. It moves from WAITING to TAKEN (the writer answers for it: committing it,
# or failed to) or to WITHDRAWN (its caller gave up), never back, under `_states`.
WAITING, TAKEN, WITHDRAWN = "waiting", "taken", "withdrawn"


class _Withdrawn(Exception):
    """Rolls back a group in which a job was withdrawn before the commit."""


class _Job:
    """One task to store, and how its caller hears of the outcome: `done` is released for a
    caller on a thread, `future` is set (on its loop) for a caller on an event loop."""

    __slots__ = ("done", "error", "existing", "future", "new", "now", "state")

    def __init__(
        self, new: NewTask, now: datetime, future: asyncio.Future[Task | None] | None = None
    ) -> None:
        self.new = new
        self.now = now
        self.future = future
        self.existing: Task | None = None
        self.error: BaseException | None = None
        self.state = WAITING
        self.done: threading.Lock | None = None
        if future is None:
            self.done = threading.Lock()
            self.done.acquire()

    def outcome(self) -> Task | None:
        if self.error is not None:
            raise self.error
        return self.existing


class GroupEnqueue:
    """Enqueues tasks so that concurrent callers commit together.

    Keyless tasks of a group go in one multi-row INSERT; keyed ones (an idempotency or a
    unique key) one by one in the same transaction. A group that fails is retried one task
    at a time, so a bad task fails alone; unless the database cannot take writes (locked,
    full, gone), when each would only wait out the same failure again. A caller waits at
    most `timeout` seconds (None: until its task is committed), then gets `WriteTimeout` and
    its task is never committed. A key already taken fails nothing: its job is answered
    with the task that holds it.
    """

    def __init__(self, db: Database, *, max_group: int = 512, timeout: float | None = None) -> None:
        self.db = db
        self.max_group = max_group
        self.timeout = timeout
        self._lock = threading.Lock()
        self._states = threading.Lock()
        # The writer thread and its queue; None until the first enqueue, and after close().
        self._writer: tuple[threading.Thread, queue.SimpleQueue[list[_Job] | None]] | None = None
        # Each event loop's jobs of the current turn, handed to the writer together at the
        # turn's end: one wake-up of the writer for all of them.
        self._gathering: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[_Job]] = (
            weakref.WeakKeyDictionary()
        )

    def enqueue(self, new: NewTask, now: datetime) -> Task | None:
        """Store `new` and return once that is committed: None when it was stored, or the
        task that holds its key (its idempotency key used before for the same request, or
        its unique key held by an active task: see `store.tasks.enqueue_once`)."""
        job = _Job(new, now)
        self._submit([job])
        assert job.done is not None
        if not job.done.acquire(timeout=-1 if self.timeout is None else self.timeout):
            self._give_up(job)
            job.done.acquire()  # being committed: the outcome is the commit's
        return job.outcome()

    async def enqueue_async(self, new: NewTask, now: datetime) -> Task | None:
        """`enqueue` for callers on an event loop: the loop never waits on the database."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Task | None] = loop.create_future()
        gathering = self._gathering.get(loop)
        if gathering is None:
            gathering = self._gathering[loop] = []
            loop.call_soon(self._hand_over, loop)
        job = _Job(new, now, future)
        gathering.append(job)
        # A timer rather than `asyncio.wait_for`, which would wrap every enqueue in a task.
        timer = None if self.timeout is None else loop.call_later(self.timeout, self._expire, job)
        try:
            return await future
        except asyncio.CancelledError:
            # The caller gave up (a cancelled request): nothing of it is committed later,
            # unless its commit is already under way.
            self._withdraw(job)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _withdraw(self, job: _Job) -> bool:
        """Take `job` back unless the writer is committing it; whether it was taken back.
        The writer then leaves it out, and does not tell its caller anything."""
        with self._states:
            if job.state != WAITING:
                return False
            job.state = WITHDRAWN
            return True

    def _timed_out(self) -> WriteTimeout:
        assert self.timeout is not None
        error = WriteTimeout(self.timeout, self.db.health.problem)
        self.db.health.failed(error.reason)
        return error

    def _give_up(self, job: _Job) -> None:
        """Raise `WriteTimeout` once `job` is withdrawn; return if it is being committed."""
        if self._withdraw(job):
            raise self._timed_out()

    def _expire(self, job: _Job) -> None:
        """`_give_up` for a caller on an event loop (on that loop): its future fails."""
        assert job.future is not None
        if not job.future.done() and self._withdraw(job):
            job.future.set_exception(self._timed_out())

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._submit(self._gathering.pop(loop))

    def close(self) -> None:
        """Stop the writer thread once it has committed what was queued; a later enqueue
        starts another."""
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is None:
                return
            thread, jobs = writer
            jobs.put(None)
        thread.join()

    def _submit(self, jobs: list[_Job]) -> None:
        # Under the lock, so that no job lands in the queue of a writer that close() stopped.
        with self._lock:
            # Not alive: this process was forked from the one that started it.
            if self._writer is None or not self._writer[0].is_alive():
                batches: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
                # A daemon: a process that never calls close() must still be able to exit.
                # Nothing is lost with it: a caller waits until its task is committed.
                thread = threading.Thread(
                    target=self._write, args=(batches,), name="backstop-enqueue", daemon=True
                )
                thread.start()
                self._writer = (thread, batches)
            self._writer[1].put(jobs)

    def _write(self, batches: queue.SimpleQueue[list[_Job] | None]) -> None:
        """The writer thread: commit what has queued, in groups, until told to stop (None)."""
        connection = KeptConnection(self.db)
        stopping = False
        try:
            while not stopping:
                group: list[_Job] = []
                batch = batches.get()
                while batch is not None:
                    group.extend(batch)
                    if len(group) >= self.max_group:
                        break
                    try:
                        batch = batches.get_nowait()
                    except queue.Empty:
                        break
                stopping = batch is None
                try:
                    _commit(connection, group, self._states)
                except BaseException as error:  # every caller hears of it; none waits forever
                    _fail(group, error, self._states)
                _settle(group)
        finally:
            connection.close()


def _commit(
    connection: KeptConnection,
    group: list[_Job],
    states: threading.Lock,
    *,
    alone: bool = False,
    again: bool = True,
) -> None:
    """Store the group's jobs that are not withdrawn in one transaction; if that fails for
    one of them, each in one of its own (unless the database cannot take writes now: then
    every job fails at once, rather than each waiting out the same timeout in turn)."""
    while True:
        live = [job for job in group if job.state != WITHDRAWN]
        if not live:
            return
        try:
            with connection.write() as conn:
                existing = _insert(conn, live)
                # The last moment a caller can withdraw: from here the COMMIT decides.
                with states:
                    if any(job.state == WITHDRAWN for job in live):
                        raise _Withdrawn
                    for job in live:
                        job.state = TAKEN
        except _Withdrawn:
            continue  # rolled back: again without the withdrawn
        except Exception as error:
            if again and isinstance(error, DBAPIError) and error.connection_invalidated:
                # The kept connection died under the group (the server restarted, or an
                # administrator ended it): once more, on a new connection.
                again = False
                continue
            if alone or len(live) == 1 or as_unavailable(error) is not None:
                _fail(live, error, states)
                return
            for job in live:
                _commit(connection, [job], states, alone=True, again=False)
            return
        for job, task in zip(live, existing, strict=True):
            job.existing = task
        return


def _fail(jobs: list[_Job], error: BaseException, states: threading.Lock) -> None:
    """Tell these jobs' callers the error; a job waiting may no longer be withdrawn."""
    with states:
        for job in jobs:
            if job.state == WAITING:
                job.state = TAKEN
            job.error = job.error or error


def _insert(conn: Connection, group: list[_Job]) -> list[Task | None]:
    enqueue_batch(conn, [(job.new, job.now) for job in group if not job.new.keyed])
    # Keyed rows in the order of their keys. On PostgreSQL an INSERT waits for the open
    # transaction that inserted the same key; groups of two processes taking shared keys in
    # different orders would each wait for the other, a deadlock that fails one group whole.
    # In one order, the one that waits holds nothing the other still needs.
    keyed = sorted((job for job in group if job.new.keyed), key=_key_order)
    holders = {id(job): _insert_once(conn, job.new, job.now) for job in keyed}
    return [holders.get(id(job)) for job in group]


def _key_order(job: _Job) -> tuple[str, str]:
    return job.new.unique_key or "", job.new.idempotency_key or ""


def _insert_once(conn: Connection, new: NewTask, now: datetime) -> Task | None:
    task, created = enqueue_once(conn, new, now=now)
    return None if created else task


def _settle(group: list[_Job]) -> None:
    """Tell each caller of the group its outcome: threads at once, and each event loop in
    one call for all of its callers (a wake-up of a loop from another thread costs a write
    to its self-pipe)."""
    waiting: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in group:
        if job.future is None:
            assert job.done is not None
            job.done.release()
        elif job.state != WITHDRAWN:  # a withdrawn caller has had its answer
            waiting.setdefault(job.future.get_loop(), []).append(job)
    for loop, jobs in waiting.items():
        # A closed loop raises RuntimeError: nobody is waiting there any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, jobs)


def _resolve(jobs: list[_Job]) -> None:
    for job in jobs:
        assert job.future is not None
        if job.future.done():  # its caller was cancelled; its task is stored all the same
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.existing)
