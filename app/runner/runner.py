"""The runner: claims due tasks, runs them, keeps their leases, and takes back lapsed ones.

An APScheduler `AsyncIOScheduler` drives the interval jobs: the claim (every
`poll_interval`, and at once when this process enqueues, another process commits, or a slot
frees up; see `app.runner.wakeup`), the check for cancel requests (at once on PostgreSQL,
where the store notifies them), the heartbeat that renews the leases of running
tasks, the reclaim of leases that lapsed elsewhere, and any extra jobs the service adds
(periodic tasks, retention). The claims, the functions and their outcomes flow through the
pipeline (`app.runner.pipeline`): sync functions on threads, async ones on the loop. Every database
call runs on one dedicated thread, so the loop never waits on SQLite's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import uuid4

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from app.observability.metrics import TaskMetrics
from app.runner.backoff import Backoff
from app.runner.dbthread import DatabaseThread
from app.runner.execution import Executor, attempt_of, report, report_expired
from app.runner.pipeline import ALL_QUEUES, Pipeline, claim_queues
from app.runner.pool import DaemonPool, call_on
from app.runner.progress import record_with_progress
from app.runner.wakeup import Doorbell, NotifyBell
from app.settings import Settings
from app.tasks.registry import Registry
from app.tasks.retry import DEFAULT_POLICY, after_lapsed_lease
from store import control, leases
from store import tasks as store_tasks
from store.engine import Database
from store.health import as_unavailable
from store.models import Task
from store.timeutil import utcnow

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[], Awaitable[object]]


def default_worker_id() -> str:
    """`host:pid:random`: unique per runner, readable in the attempts list."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:6]}"


class Runner:
    """Runs the tasks of one process: per named queue up to its concurrency, or up to
    `settings.concurrency` over every queue when no queues are named."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        settings: Settings,
        *,
        queues: Mapping[str, int] | None = None,
        worker_id: str | None = None,
        on_finished: Callable[[], None] | None = None,
        inline: bool = False,
        metrics: TaskMetrics | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.db = db
        self.registry = registry
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        named = dict(queues if queues is not None else settings.queues)
        self.limits: dict[str | None, int] = {ALL_QUEUES: settings.concurrency}
        if named:
            self.limits = {queue: limit for queue, limit in named.items()}
        self._on_finished = on_finished or (lambda: None)
        # Inline (the test kit's drain): database calls and sync functions run on the
        # caller's thread, one after the other; no thread is ever started.
        self.inline = inline
        self.database = DatabaseThread(db, inline=inline)
        self.threads = DaemonPool(self.capacity)
        self.metrics = metrics or TaskMetrics()
        self.executor = Executor(registry, settings, tracer_provider=tracer_provider)
        self.pipeline = Pipeline(
            self.database,
            self.executor,
            self.threads,
            self.limits,
            owner=self.worker_id,
            lease_seconds=settings.lease_seconds,
            on_finished=self._finished,
            metrics=self.metrics,
            rates=settings.rate_limits,
        )
        self._extra_jobs: list[tuple[str, Job, float]] = []
        self._in_flight: dict[str, asyncio.Future[object]] = {}
        self._doorbell: Doorbell | NotifyBell | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False

    @property
    def capacity(self) -> int:
        """How many tasks this runner runs at once, over all its queues."""
        return sum(self.limits.values())

    def add_job(self, job_id: str, job: Job, every: float) -> None:
        """Run `job` every `every` seconds while the runner runs (before `start`)."""
        self._extra_jobs.append((job_id, job, every))

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start claiming: the interval jobs run on the current event loop. A stopped runner
        can start again (on this loop or another)."""
        if self.inline:
            raise RuntimeError("an inline runner (the test kit's drain) runs only by run_once")
        self._loop = asyncio.get_running_loop()
        self.pipeline.loop = self._loop
        self.database.open()
        lease = self.settings.lease_seconds
        poll = self.settings.poll_interval
        scheduler = AsyncIOScheduler(event_loop=self._loop, timezone=UTC)
        jobs: list[tuple[str, Job, float]] = [
            ("claim", self._poll, poll),
            ("cancels", self._check_cancels, poll),
            ("heartbeat", self._heartbeat, lease / 3),
            ("reclaim", self.reclaim, min(max(lease / 2, poll), 10.0)),
            *self._extra_jobs,
        ]
        for job_id, func, seconds in jobs:
            scheduler.add_job(
                self._solo(job_id, func),
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
        self.pipeline.claiming = True
        # Other processes' enqueues are seen within milliseconds, not at the next poll.
        if self.db.dialect == "sqlite":
            self._doorbell = Doorbell(self.db, self.notify, self.pipeline.waiting)
        elif self.db.dialect == "postgresql":
            self._doorbell = NotifyBell(
                self.db, self.notify, self._cancel_heard, self.serves, poll_interval=poll
            )
        if self._doorbell is not None:
            self._doorbell.start()
        served = ", ".join(f"{q or '*'}={n}" for q, n in self.limits.items())
        rated = "".join(
            f", {queue} at most {rate}" for queue, rate in sorted(self.settings.rate_limits.items())
        )
        log.info("runner %s started (queues %s%s)", self.worker_id, served, rated)

    def _solo(self, job_id: str, func: Job) -> Job:
        """The job as APScheduler runs it: it starts `func` in the background and returns,
        unless the previous run is still going. A slow run (the database busy) then skips a
        beat quietly instead of making APScheduler log a warning at every interval. A run
        that fails is logged (the first of a row) and the next waits out a back-off."""
        backoff = Backoff(f"runner {self.worker_id}: {job_id}")

        async def run() -> None:
            try:
                await func()
            except Exception as error:
                backoff.failed(error)
            else:
                backoff.succeeded()

        async def start() -> None:
            if self.db.health.gone is not None:
                return  # the database file is gone: no more work here (the store said so)
            previous = self._in_flight.get(job_id)
            if (previous is None or previous.done()) and backoff.ready():
                self._in_flight[job_id] = asyncio.ensure_future(run())

        return start

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming, wait up to `grace` seconds for running tasks, release the rest.

        Released tasks are queued again at once without counting the attempt. The heartbeat
        keeps their leases alive while they finish.
        """
        grace = self.settings.shutdown_grace if grace is None else grace
        self._accepting = False
        self.pipeline.claiming = False
        if self._doorbell is not None:
            self._doorbell.stop()
            self._doorbell = None
        if self._scheduler is not None:
            for job_id in ("claim", "reclaim", *(job_id for job_id, _, _ in self._extra_jobs)):
                self._scheduler.remove_job(job_id)
        try:
            # A cycle already in flight still starts what it claimed: let it land first, so
            # those tasks are waited for and released like the rest, not left running.
            await self.database.call(lambda: None)
            held = self.pipeline.snapshot()
            if held:
                log.info(
                    "runner %s waiting up to %.0fs for %d tasks", self.worker_id, grace, len(held)
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.pipeline.settled(set(held)), grace)
            await self._release_leftovers()
        finally:
            self.pipeline.close()
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
            for job in self._in_flight.values():
                job.cancel()
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
            self._in_flight.clear()
            self.database.shutdown()
            self.threads.shutdown()
            log.info("runner %s stopped", self.worker_id)

    async def _release_leftovers(self) -> None:
        # The outcomes already handed in are written first: a task whose function returned
        # just now is recorded, not released and run again.
        await self.database.call(self.pipeline.flush)
        leftover = list(self.pipeline.snapshot().values())
        if not leftover:
            return
        for entry in leftover:
            entry.ctx.stop.flag()  # sync functions see `cancelled`
            if entry.job is not None:
                entry.job.cancel()  # async ones are cancelled with their runner task
        # Whatever is still held goes back to the queue, outcomes that could not be written
        # too (the release is fenced by the lease, so nothing written is undone).
        try:
            count = await self.write(leases.release, [entry.claim.lease for entry in leftover])
        except Exception as error:
            unavailable = as_unavailable(error)
            if unavailable is None:
                raise
            # The stop goes on: these tasks are reclaimed once their leases lapse.
            log.warning(
                "runner %s could not release %d unfinished tasks; their leases will lapse: %s",
                self.worker_id,
                len(leftover),
                unavailable.reason,
            )
        else:
            log.warning("runner %s released %d unfinished tasks", self.worker_id, count)
        finally:
            self.pipeline.forget(leftover)
        jobs = [entry.job for entry in leftover if entry.job is not None]
        if jobs:
            await asyncio.wait(jobs)

    def notify(self) -> None:
        """Claim now rather than at the next poll: a task was just enqueued. Thread-safe."""
        if self._accepting:
            self.pipeline.wake()

    def serves(self, queue: str) -> bool:
        """Whether this runner claims tasks of `queue`."""
        return ALL_QUEUES in self.limits or queue in self.limits

    def _cancel_heard(self, task_id: str) -> None:
        """Another process asked a task to stop (from the listener's thread)."""
        if task_id in self.pipeline.running:
            self.cancel_local(task_id)

    def cancel_local(self, task_id: str) -> None:
        """Stop a task this runner is running, now (its cancel request is already stored)."""

        def stop() -> None:
            entry = self.pipeline.running.get(task_id)
            if entry is not None:
                log.info("%s cancelling", attempt_of(entry.claim))
                entry.ctx.stop.request()

        if self._accepting:
            call_on(self._loop, stop)

    # -- the test seam -------------------------------------------------------------------

    async def run_once(self, *, now: datetime | None = None) -> list[Task]:
        """Claim what is due as of `now`, run it to completion, return the finished tasks.

        Outcomes and retry times are reckoned as of `now` too, so tests can pin the clock.
        """
        claimed = await self.write(
            claim_queues,
            self.worker_id,
            self.limits,
            lease_seconds=self.settings.lease_seconds,
            now=now,
            rates=self.settings.rate_limits,
        )
        batch = claimed.all()
        if not batch:
            return []
        if self.inline:
            self.metrics.started(batch)
            for claim in batch:
                ctx = self.pipeline.context(claim)
                outcome = await self.executor.call_async(claim, ctx, now=now)
                [state] = await self.write(
                    record_with_progress, self.pipeline.progress.take_for([claim.id]), [outcome]
                )
                report(claim, outcome, state)
                self.metrics.finished([(claim, outcome, state)])
                self._finished()
        else:
            self.pipeline.loop = asyncio.get_running_loop()
            self.database.open()
            self.pipeline.start(batch, now=now)
            await self.pipeline.settled({claim.id for claim in batch})
        return await self.read(store_tasks.get_tasks, [claim.id for claim in batch])

    async def drain(self, *, now: datetime | None = None, limit: int = 10_000) -> list[Task]:
        """Run due tasks until none is left (as of `now`); returns every task it ran."""
        done: dict[str, Task] = {}
        while len(done) < limit:
            batch = await self.run_once(now=now)
            if not batch:
                break
            done.update((task.id, task) for task in batch)
        return list(done.values())

    # -- claiming, leases and cancels ----------------------------------------------------

    async def _poll(self) -> None:
        self.pipeline.wake()

    def _finished(self) -> None:
        self._on_finished()

    async def _check_cancels(self) -> None:
        """Stop the running tasks that were cancelled elsewhere (another process's API)."""
        running = list(self.pipeline.snapshot())
        if not running:
            return
        asked = await self.read(control.cancel_requested, running)
        for task_id in asked:
            self.cancel_local(task_id)

    async def _heartbeat(self) -> None:
        held_before = self.pipeline.snapshot()
        if not held_before:
            self.pipeline.leases_in_doubt = False  # nothing held, nothing to doubt
            return
        lease = self.settings.lease_seconds
        try:
            if self.pipeline.leases_in_doubt:
                # The last heartbeats failed: the leases may have lapsed while this runner
                # held on. Ours still, unless a reclaim took them: keep them.
                mine = [entry.claim.lease for entry in held_before.values()]
                held = await self.write(leases.renew_held, mine, lease_seconds=lease)
            else:
                held = await self.write(
                    leases.extend_leases, self.worker_id, list(held_before), lease_seconds=lease
                )
        except Exception:
            self.pipeline.leases_in_doubt = True
            raise  # logged by the job's back-off (`_solo`)
        self.pipeline.leases_in_doubt = False
        for task_id, entry in held_before.items():
            if task_id not in held and self.pipeline.running.get(task_id) is entry:
                log.warning("%s lost its lease; asking it to stop", attempt_of(entry.claim))
                entry.ctx.stop.request()

    async def reclaim(self, *, now: datetime | None = None) -> list[Task]:
        """Fail the attempts whose leases lapsed (their runners died); the reclaimed tasks.
        Raises the database's error when it cannot be reached."""
        now = now or utcnow()
        # After writes failed, our own tasks may sit on lapsed leases (functions running, or
        # finished with their outcomes waiting): until the heartbeat has renewed them,
        # nothing is reclaimed, or they would be among it and run again.
        if self.pipeline.leases_in_doubt:
            return []

        def decide(task: Task) -> datetime | None:
            spec = self.registry.get(task.name) if task.name in self.registry else None
            policy = spec.policy if spec is not None else DEFAULT_POLICY
            return after_lapsed_lease(
                policy, task.attempts, task.max_attempts, task.created_at, now
            )

        reclaimed = await self.write(
            leases.reclaim_expired,
            decide,
            max_expirations=self.settings.max_lease_expiries,
            now=now,
        )
        for task in reclaimed:
            report_expired(task, now)
            self.metrics.expired(task)
        if reclaimed:
            self._finished()
            self.notify()
        return reclaimed

    # -- database ------------------------------------------------------------------------

    async def write(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(conn, ...)` in a write transaction, on the runner's database thread."""
        return await self.database.write(fn, *args, **kwargs)

    async def read(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(conn, ...)` in a read transaction, on the runner's database thread."""
        return await self.database.read(fn, *args, **kwargs)
