"""Group commit: concurrent enqueues of one process share a transaction.

SQLite commits one transaction at a time, and each commit has a fixed cost (a WAL write,
and with `synchronous=FULL` an fsync). Under load, the first thread to take the writer's
seat commits everything queued behind it in one transaction, so the cost is paid once per
group rather than once per request, and nobody waits for more than one commit.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from sqlalchemy.engine import Connection

from store.engine import Database
from store.models import Task
from store.tasks import NewTask, enqueue_batch, enqueue_once


class _Job:
    __slots__ = ("error", "new", "now", "result")

    def __init__(self, new: NewTask, now: datetime) -> None:
        self.new = new
        self.now = now
        self.result: tuple[Task, bool] | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class GroupEnqueue:
    """Enqueues tasks so that concurrent callers commit together.

    Keyless tasks of a group go in one multi-row INSERT; keyed ones (idempotency) one by one
    in the same transaction. A group that fails is retried one task at a time, so a bad
    task fails alone.
    """

    def __init__(self, db: Database, *, max_group: int = 512) -> None:
        self.db = db
        self.max_group = max_group
        self._seat = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue: list[_Job] = []
        # The async side: callers on an event loop hand their task to one writer thread, and
        # whatever queued while it committed goes in its next transaction.
        self._writer: ThreadPoolExecutor | None = None
        self._waiting: list[tuple[_Job, asyncio.Future[tuple[Task, bool]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def enqueue(self, new: NewTask, now: datetime) -> tuple[Task, bool]:
        """Store `new` (once, under its idempotency key if it has one) and return once that
        is committed: `(task, created)` as `store.tasks.enqueue_once` answers."""
        job = _Job(new, now)
        with self._queue_lock:
            self._queue.append(job)
        while not job.done:
            with self._seat:
                if job.done:  # a leader committed it while this thread waited for the seat
                    break
                with self._queue_lock:
                    group = self._queue[: self.max_group]
                    del self._queue[: self.max_group]
                self._commit(group)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    async def enqueue_async(self, new: NewTask, now: datetime) -> tuple[Task, bool]:
        """`enqueue` for callers on an event loop: the loop never waits on the database."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Task, bool]] = loop.create_future()
        self._waiting.append((_Job(new, now), future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch = self._waiting[: self.max_group]
            del self._waiting[: self.max_group]
            group = [job for job, _ in batch]
            if self._writer is None:  # started on first use, and again after close()
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="backstop-enqueue")
            try:
                await loop.run_in_executor(self._writer, self._commit_seated, group)
            except BaseException as error:  # every caller hears of it; none waits forever
                for job in group:
                    job.error = job.error or error
            for job, future in batch:
                if future.done():
                    continue
                if job.error is not None:
                    future.set_exception(job.error)
                else:
                    assert job.result is not None
                    future.set_result(job.result)

    def _commit_seated(self, group: list[_Job]) -> None:
        with self._seat:  # shared with the threads' groups: one writer at a time
            self._commit(group)

    def close(self) -> None:
        """Stop the writer thread (after what it is committing); a later call starts one."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _commit(self, group: list[_Job]) -> None:
        try:
            with self.db.write() as conn:
                results = _insert(conn, group)
        except Exception as error:
            if len(group) == 1:
                group[0].error = error
                return
            for job in group:
                self._commit([job])
            return
        for job, result in zip(group, results, strict=True):
            job.result = result


def _insert(conn: Connection, group: list[_Job]) -> list[tuple[Task, bool]]:
    plain = [job for job in group if job.new.idempotency_key is None]
    inserted = iter(enqueue_batch(conn, [(job.new, job.now) for job in plain]))
    return [
        (next(inserted), True)
        if job.new.idempotency_key is None
        else enqueue_once(conn, job.new, now=job.now)
        for job in group
    ]
