"""Waiting on tasks without polling: one watcher per process tells every waiter of a change.

`GET /tasks/{id}?wait=`, `GET /tasks/{id}/events` and `TaskClient.wait` each hold a
`Changes` for the task they wait on. The watcher (`TaskWatch`) has one daemon thread,
`backstop-watch`, started at the first wait and stopped when the Backstop closes; it hears
that the database changed through the same wake-ups the runner uses (`app.runner.wakeup`):

- SQLite: a `Doorbell` (inotify on the database's folder, then `PRAGMA data_version`): any
  commit, by any process, rings it within a few milliseconds.
- PostgreSQL: a `NotifyBell` listening on `TASK_CHANNEL`, on which the store names each task
  whose state, attempt or progress a transaction changed (`store.changes.notify_changed`).

At a ring the thread reads a small mark (state, attempt, lease, progress) of every watched
task that may have changed, in one query, then the whole row of those whose mark moved, and
hands it to their waiters, which wake on their own thread or event loop. Thousands of waiters
cost one thread, one read per ring, and nothing per waiter until its task changes.

A change quickly followed by another may be read only as the latter: a waiter sees each
state its task is in when the thread reads it, not necessarily every one it passed through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from app.runner.wakeup import Doorbell, NotifyBell
from store import tasks as store_tasks
from store.changes import TASK_CHANNEL, Notice, changed_ids
from store.engine import Database
from store.models import Task

log = logging.getLogger(__name__)

# The watcher reads again no sooner than this after a read, nor sooner than `READ_SHARE`
# times what that read took: under a stream of commits and thousands of waiters (a read of
# a thousand tasks' marks takes milliseconds) it keeps to a fifth of a core and to the GIL's
# fair share, and a finish is heard a little later instead.
MIN_GAP = 0.005
READ_SHARE = 4.0


class Changes:
    """A waiter's view of one task: `next` returns the task each time the watcher reads a
    change of it (None once the task no longer exists). Coalescing: a waiter that was busy
    gets the latest read, not every one in between. Once the watcher closes, `closed` is
    true and `next` returns `[]` at once."""

    def __init__(self, task_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.task_id = task_id
        self._loop = loop
        self._lock = threading.RLock()
        self._latest: list[Task | None] = []
        self._ready = threading.Event()
        self._ready_async = asyncio.Event() if loop is not None else None
        self.closed = False

    def deliver(self, task: Task | None) -> None:
        """Hand over the task as just read (from the watcher's thread)."""
        with self._lock:
            self._latest[:] = [task]
            if self._loop is None:
                self._ready.set()
                return
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._set_async)

    def close(self) -> None:
        """The watcher stopped: wake the waiter for good (from any thread)."""
        with self._lock:
            self.closed = True
            if self._loop is None:
                self._ready.set()
                return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._set_async)

    def _set_async(self) -> None:
        assert self._ready_async is not None
        self._ready_async.set()

    def _take(self) -> list[Task | None]:
        with self._lock:
            taken, self._latest = self._latest, []
        return taken

    def next(self, timeout: float | None) -> list[Task | None]:
        """Wait up to `timeout` seconds for a change: `[task]` (None: it was deleted), or
        `[]` when none came in time."""
        if not self._ready.wait(timeout):
            return []
        with self._lock:  # cleared with the take: a delivery in between is not lost
            if not self.closed:
                self._ready.clear()
            return self._take()

    async def next_async(self, seconds: float | None) -> list[Task | None]:
        """`next` for a waiter on the event loop it was made for (`seconds`: its timeout)."""
        assert self._ready_async is not None, "made for a thread: call next()"
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            try:
                await asyncio.wait_for(self._ready_async.wait(), remaining)
            except TimeoutError:
                return []
            if not self.closed:
                self._ready_async.clear()
            taken = self._take()
            if taken or self.closed:  # else a wake-up for what an earlier take already got
                return taken


class TaskWatch:
    """The process's watcher of tasks somebody waits on (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._waiters: dict[str, set[Changes]] = {}
        self._marks: dict[str, tuple[Any, ...] | None] = {}
        self._bell: Doorbell | NotifyBell | None = None
        self._stop = threading.Event()
        self._next_read = 0.0  # monotonic; see MIN_GAP

    @contextlib.contextmanager
    def changes(self, task_id: str, *, on_loop: bool = False) -> Iterator[Changes]:
        """Be told of every change of `task_id` while inside: on this thread, or (with
        `on_loop`) on the running event loop. Enter before reading the task, so that no
        change after the read goes unheard."""
        loop = asyncio.get_running_loop() if on_loop else None
        changes = Changes(task_id, loop)
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(changes)
            self._start()
        try:
            yield changes
        finally:
            with self._lock:
                waiting = self._waiters.get(task_id)
                if waiting is not None:
                    waiting.discard(changes)
                    if not waiting:
                        del self._waiters[task_id]
                        self._marks.pop(task_id, None)

    def waiting(self, task_id: str) -> bool:
        """Whether anybody in this process waits on `task_id` now."""
        with self._lock:
            return task_id in self._waiters

    def close(self) -> None:
        """Stop the thread; the waiters still inside `changes` are woken (`Changes.closed`).
        A later wait starts it again (an app's lifespan may run again)."""
        with self._lock:
            bell, self._bell = self._bell, None
            self._stop.set()
            waiting = [changes for each in self._waiters.values() for changes in each]
        for changes in waiting:
            changes.close()
        if bell is not None:
            bell.stop()

    def _start(self) -> None:
        """Start the thread, the first time anybody waits (under `_lock`)."""
        if self._bell is not None:
            return
        self._stop.clear()
        if self.db.dialect == "postgresql":
            self._bell = _ChangeBell(self.db, self._changed)
        else:  # a SQLite file (the store takes no other SQLite database)
            self._bell = Doorbell(self.db, self._changed, name="backstop-watch")
        self._bell.start()

    def _changed(self, task_ids: set[str] | None = None) -> None:
        """The database changed (these tasks, or any when None): read what is watched and
        hand each changed task to its waiters. On the watcher's thread."""
        with self._lock:
            known = self._waiters.keys()
            watched = list(known) if task_ids is None else list(task_ids & known)
        if not watched:
            return
        pause = self._next_read - time.monotonic()
        if pause > 0 and self._stop.wait(pause):  # the commits meanwhile are read together
            return
        started = time.monotonic()
        try:
            with self.db.read() as conn:
                marks = store_tasks.task_marks(conn, watched)
                with self._lock:
                    # () for a task not read before; None for one that no longer exists.
                    moved = [i for i in watched if marks.get(i) != self._marks.get(i, ())]
                    self._marks.update({i: marks.get(i) for i in moved if i in self._waiters})
                tasks = {task.id: task for task in store_tasks.get_tasks(conn, moved)}
        except Exception:
            log.exception("watch: could not read the watched tasks")
            return
        finally:
            done = time.monotonic()
            self._next_read = done + max(MIN_GAP, READ_SHARE * (done - started))
        with self._lock:
            deliveries = [
                (changes, tasks.get(task_id))
                for task_id in moved
                for changes in self._waiters.get(task_id, ())
            ]
        for changes, task in deliveries:
            changes.deliver(task)


# How often the watcher reads the watched tasks when no signal can reach it (seconds).
DEAF_POLL = 0.25


class _ChangeBell(NotifyBell):
    """A `NotifyBell` on `TASK_CHANNEL`: hands on the ids of the tasks that changed; at each
    LISTEN that takes (and each loss), says that any task may have changed."""

    def __init__(self, db: Database, changed: Callable[[set[str] | None], None]) -> None:
        super().__init__(
            db,
            lambda: changed(None),
            lambda _task_id: None,
            poll_interval=DEAF_POLL,
            channels=(TASK_CHANNEL,),
            name="backstop-watch",
        )
        self._changed = changed

    def _deaf(self) -> None:
        # Behind a pooler that drops LISTEN nothing is heard: read what is watched on a
        # timer instead (the waits still answer, a little later), until the bell stops.
        while not self._stop.is_set():
            self._changed(None)
            self._pause(DEAF_POLL)

    def _heard(self, notices: list[Notice]) -> bool:
        self._changed({task_id for notice in notices for task_id in changed_ids(notice.payload)})
        return False
