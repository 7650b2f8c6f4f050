"""The runner: claims due tasks, runs them, and writes each outcome under its lease.

An APScheduler `AsyncIOScheduler` drives three interval jobs: the claim (every
`poll_interval`, and at once when this process enqueues or a slot frees up with work
waiting), the heartbeat that renews the leases of running tasks, and the reclaim of leases
that lapsed elsewhere. Sync functions run on threads and async ones on the loop. Every
database call runs on one dedicated thread, so the loop never waits on SQLite's lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import traceback
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import uuid4

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pydantic_core import to_jsonable_python
from tenacity import retry_always

from app.context import TaskContext
from app.registry import Registry, TaskSpec
from app.retry import DEFAULT_POLICY, next_run_at
from app.settings import Settings
from app.threads import run_in_daemon_thread
from store import leases, outcomes
from store import tasks as store_tasks
from store.engine import Database
from store.models import Lease, Task, lease_of
from store.timeutil import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskTimeout(TimeoutError):
    """An attempt ran past its task's `timeout`."""

    def __init__(self, timeout: float, straggler: asyncio.Future[Any] | None = None) -> None:
        super().__init__(f"timed out after {timeout:g}s")
        # A sync function's thread, still running: it cannot be killed, only asked to stop.
        self.straggler = straggler


class LeaseExpired(Exception):
    """The runner holding a task stopped renewing its lease (it died, or lost the database)."""


@dataclass
class _Running:
    lease: Lease
    ctx: TaskContext
    job: asyncio.Task[None]


def default_worker_id() -> str:
    """`host:pid:random`: unique per runner, readable in the attempts list."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:6]}"


class Runner:
    """Runs the tasks of one process, at most `settings.concurrency` at a time."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        settings: Settings,
        *,
        worker_id: str | None = None,
        on_finished: Callable[[Task], None] | None = None,
    ) -> None:
        self.db = db
        self.registry = registry
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self._on_finished = on_finished or (lambda task: None)
        self._running: dict[str, _Running] = {}
        self._db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backstop-db")
        self._scheduler: AsyncIOScheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._claiming = False
        self._claim_landed = asyncio.Event()  # set while no claim is in flight
        self._claim_landed.set()
        self._claim_again = False
        self._backlog = False
        self._filler: asyncio.Future[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming: the interval jobs run on the current event loop."""
        self._loop = asyncio.get_running_loop()
        lease = self.settings.lease_seconds
        scheduler = AsyncIOScheduler(event_loop=self._loop, timezone=UTC)
        jobs: list[tuple[str, Callable[[], Coroutine[Any, Any, None]], float]] = [
            ("claim", self._poll, self.settings.poll_interval),
            ("heartbeat", self._heartbeat, lease / 3),
            ("reclaim", self._reclaim, min(max(lease / 2, self.settings.poll_interval), 10.0)),
        ]
        for job_id, func, seconds in jobs:
            scheduler.add_job(
                func,
                "interval",
                seconds=seconds,
                id=job_id,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
                next_run_time=datetime.now(UTC),
            )
        scheduler.start()
        self._scheduler = scheduler
        self._accepting = True
        log.info("runner %s started (concurrency %d)", self.worker_id, self.settings.concurrency)

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming, wait up to `grace` seconds for running tasks, release the rest.

        Released tasks are queued again at once without counting the attempt. The heartbeat
        keeps their leases alive while they finish.
        """
        grace = self.settings.shutdown_grace if grace is None else grace
        self._accepting = False
        if self._scheduler is not None:
            for job_id in ("claim", "reclaim"):
                self._scheduler.remove_job(job_id)
        # A claim already in flight still starts what it took: let it land first, so those
        # tasks are waited for and released like the rest, not left running under a lease.
        await self._claim_landed.wait()
        pending = [running.job for running in self._running.values()]
        if pending:
            log.info(
                "runner %s waiting up to %.0fs for %d tasks", self.worker_id, grace, len(pending)
            )
            await asyncio.wait(pending, timeout=grace)
        leftover = list(self._running.values())
        for running in leftover:
            running.ctx.cancel()
            running.job.cancel()
        if leftover:
            count = await self._write(leases.release, [r.lease for r in leftover])
            log.warning("runner %s released %d unfinished tasks", self.worker_id, count)
            await asyncio.wait([r.job for r in leftover])
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        self._db_thread.shutdown(wait=True)
        log.info("runner %s stopped", self.worker_id)

    def notify(self) -> None:
        """Claim now rather than at the next poll: a task was just enqueued. Thread-safe."""
        loop = self._loop
        if loop is None or not self._accepting or loop.is_closed():
            return
        try:
            running_loop = asyncio.get_running_loop()
        except RuntimeError:
            running_loop = None
        if running_loop is loop:
            self._kick()
        else:
            loop.call_soon_threadsafe(self._kick)

    # -- the test seam -------------------------------------------------------------------

    async def run_once(self, *, now: datetime | None = None) -> list[Task]:
        """Claim what is due as of `now`, run it to completion, return the finished tasks.

        Outcomes and retry times are reckoned as of `now` too, so tests can pin the clock.
        """
        claimed = await self._write(
            leases.claim_due,
            self.worker_id,
            self.settings.concurrency,
            lease_seconds=self.settings.lease_seconds,
            now=now,
        )
        if not claimed:
            return []
        await asyncio.gather(*(self._execute(task, now=now) for task in claimed))
        return await self._read(store_tasks.get_tasks, [task.id for task in claimed])

    async def drain(self, *, now: datetime | None = None, limit: int = 10_000) -> list[Task]:
        """Run due tasks until none is left (as of `now`); returns every task it ran."""
        done: dict[str, Task] = {}
        while len(done) < limit:
            batch = await self.run_once(now=now)
            if not batch:
                break
            done.update((task.id, task) for task in batch)
        return list(done.values())

    # -- claiming ------------------------------------------------------------------------

    async def _poll(self) -> None:
        # Returns at once: a claim that is slow (the database busy) must not make the
        # scheduler skip runs of this job and log about it.
        self._kick()

    def _kick(self) -> None:
        if self._claiming:
            self._claim_again = True
        else:
            self._filler = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        """Claim up to the free slots and start each task; repeat while asked to."""
        if self._claiming:
            self._claim_again = True
            return
        self._claiming = True
        self._claim_landed.clear()
        try:
            while self._accepting:
                self._claim_again = False
                free = self.settings.concurrency - len(self._running)
                if free <= 0:
                    break
                claimed = await self._write(
                    leases.claim_due,
                    self.worker_id,
                    free,
                    lease_seconds=self.settings.lease_seconds,
                )
                self._backlog = len(claimed) == free
                for task in claimed:
                    self._start(task)
                if not self._claim_again:
                    break
        except Exception:
            log.exception("runner %s: claim failed; retrying at the next poll", self.worker_id)
        finally:
            self._claiming = False
            self._claim_landed.set()

    def _start(self, task: Task) -> None:
        ctx = TaskContext(task_id=task.id, attempt=task.attempts, settings=self.settings)
        job = asyncio.ensure_future(self._execute(task, ctx))
        self._running[task.id] = _Running(lease_of(task), ctx, job)

        def done(_job: asyncio.Future[None]) -> None:
            current = self._running.get(task.id)
            if current is not None and current.job is job:
                del self._running[task.id]
            if self._backlog and self._accepting:
                self._kick()

        job.add_done_callback(done)

    # -- running -------------------------------------------------------------------------

    async def _execute(
        self, task: Task, ctx: TaskContext | None = None, *, now: datetime | None = None
    ) -> None:
        ctx = ctx or TaskContext(task_id=task.id, attempt=task.attempts, settings=self.settings)
        lease = lease_of(task)
        spec: TaskSpec | None = None
        log.debug("task %s attempt %d: running %s", task.id, ctx.attempt, task.name)
        try:
            spec = self.registry.get(task.name)
            args, kwargs = spec.load(task.args, task.kwargs)
            if spec.context_param is not None:
                kwargs[spec.context_param] = ctx
            result = to_jsonable_python(await self._call(spec, args, kwargs, ctx))
        except asyncio.CancelledError:
            # Only a stop past its grace cancels a task; the stop releases the lease.
            raise
        except Exception as exc:
            await self._failed(task, lease, spec, exc, now=now)
            if isinstance(exc, TaskTimeout) and exc.straggler is not None:
                # Keep the runner slot until the thread returns, so that stuck threads
                # cannot pile up past `concurrency`.
                await asyncio.wait([exc.straggler])
            return
        finished = await self._write(outcomes.mark_succeeded, lease, result, now=now)
        if finished is None:
            log.warning(
                "task %s attempt %d: lease lost; success not recorded", task.id, ctx.attempt
            )
            return
        log.info("task %s attempt %d: succeeded", task.id, ctx.attempt)
        self._on_finished(finished)

    async def _call(
        self, spec: TaskSpec, args: list[Any], kwargs: dict[str, Any], ctx: TaskContext
    ) -> Any:
        if spec.is_async:
            deadline = asyncio.timeout(spec.timeout)
            try:
                async with deadline:
                    return await spec.fn(*args, **kwargs)
            except TimeoutError:
                if spec.timeout is None or not deadline.expired():
                    raise  # the function's own TimeoutError
                raise TaskTimeout(spec.timeout) from None
        thread = run_in_daemon_thread(spec.fn, *args, **kwargs)
        done, _ = await asyncio.wait([thread], timeout=spec.timeout)
        if done:
            return thread.result()
        assert spec.timeout is not None
        ctx.cancel()
        thread.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise TaskTimeout(spec.timeout, straggler=thread)

    async def _failed(
        self,
        task: Task,
        lease: Lease,
        spec: TaskSpec | None,
        error: Exception,
        *,
        now: datetime | None = None,
    ) -> None:
        now = now or utcnow()
        run_at = next_run_at(
            spec.policy if spec is not None else DEFAULT_POLICY,
            task.attempts,
            error,
            max_attempts=task.max_attempts,
            created_at=task.created_at,
            now=now,
        )
        message = f"{type(error).__name__}: {error}"
        trace = "".join(traceback.format_exception(error))
        finished = await self._write(outcomes.fail_attempt, lease, message, trace, run_at, now=now)
        if finished is None:
            log.warning(
                "task %s attempt %d: lease lost; failure not recorded", task.id, task.attempts
            )
            return
        if run_at is None:
            log.warning("task %s attempt %d: failed for good: %s", task.id, task.attempts, message)
        else:
            log.info("task %s attempt %d: %s; retry at %s", task.id, task.attempts, message, run_at)
        self._on_finished(finished)

    # -- leases --------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        held_before = {task_id: r for task_id, r in self._running.items()}
        if not held_before:
            return
        try:
            held = await self._write(
                leases.extend_leases,
                self.worker_id,
                list(held_before),
                lease_seconds=self.settings.lease_seconds,
            )
        except Exception:
            log.exception("runner %s: heartbeat failed", self.worker_id)
            return
        for task_id, running in held_before.items():
            if task_id not in held and self._running.get(task_id) is running:
                log.warning("task %s attempt %d: lease lost", task_id, running.ctx.attempt)
                running.ctx.cancel()

    async def _reclaim(self, *, now: datetime | None = None) -> None:
        now = now or utcnow()

        def decide(task: Task) -> datetime | None:
            spec = self.registry.get(task.name) if task.name in self.registry else None
            policy = spec.policy if spec is not None else DEFAULT_POLICY
            # A lapsed lease is never the function's verdict: the runner died, so it is
            # always worth another attempt, within the policy's attempts, stop and wait.
            return next_run_at(
                replace(policy, retry=retry_always),
                task.attempts,
                LeaseExpired(leases.LEASE_EXPIRED),
                max_attempts=task.max_attempts,
                created_at=task.created_at,
                now=now,
            )

        try:
            reclaimed = await self._write(leases.reclaim_expired, decide, now=now)
        except Exception:
            log.exception("runner %s: reclaim failed", self.worker_id)
            return
        for task in reclaimed:
            log.warning(
                "task %s attempt %d: lease expired; now %s", task.id, task.attempts, task.status
            )
            self._on_finished(task)
        if reclaimed:
            self._kick()

    # -- database ------------------------------------------------------------------------

    async def _write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        def run() -> T:
            with self.db.write() as conn:
                return fn(conn, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._db_thread, run)

    async def _read(self, fn: Callable[..., T], /, *args: Any) -> T:
        def run() -> T:
            with self.db.read() as conn:
                return fn(conn, *args)

        return await asyncio.get_running_loop().run_in_executor(self._db_thread, run)
