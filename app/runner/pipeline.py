"""The runner's hot path: claim, run, record, in batches, with the event loop out of the way.

One cycle on the database thread writes every outcome that came in since the last one and,
in the same transaction, claims tasks for the slots those outcomes freed. Sync functions
then run on the worker threads, which work out their own outcomes (the result, or the retry
policy's verdict and the traceback) and hand them straight back to the next cycle; async
functions run on the event loop. A task costs the loop nothing unless its function is async
or has a timeout, and the write lock is held for the statements alone.

Rate-limited queues (`BACKSTOP_RATE_LIMITS`) are claimed apart, no further than their
allowance (`store.ratelimits`). A claim that used one up says when it reopens: the pipeline
asks nothing of that queue until then, and a timer wakes the cycle that does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from app.observability.metrics import TaskMetrics
from app.runner.backoff import Backoff
from app.runner.dbthread import DatabaseThread
from app.runner.execution import Executor, TaskTimeout, attempt_of, report
from app.runner.pool import DaemonPool, call_on
from app.runner.progress import ProgressKeeper, record_with_progress
from app.tasks.context import TaskContext
from store import leases
from store.errors import DatabaseFileGone
from store.health import as_unavailable
from store.models import Claim, TaskStatus
from store.outcomes import Outcome
from store.progress import record_progress
from store.ratelimits import RateLimit, claim_limited
from store.timeutil import utcnow

log = logging.getLogger(__name__)

ALL_QUEUES: None = None

# Pauses before writing outcomes again after their transaction failed (the database locked,
# full, or gone for a while), the last one repeated for as long as the runner runs. An
# outcome is never given up: its task stays this runner's. Its lease may lapse meanwhile
# (the heartbeat cannot write either): the transaction that writes the outcome at last
# renews it first (`leases.renew_held`), and this runner reclaims nothing until its
# heartbeat gets through again (`Runner.reclaim`), so a finished function is not run again
# because the database could not hear of it in time.
RECORD_RETRIES: tuple[float, ...] = (0.1, 0.5, 2.0, 5.0)

# While claims keep finding the queue nearly empty, cycles start at most this often (seconds).
GATHER = 0.005


@dataclass(slots=True)
class Claimed:
    """What one transaction's claims took, by slot pool (a queue, or `None`: any queue), and
    when each limited queue whose allowance ran out may start a task again."""

    tasks: dict[str | None, list[Claim]] = field(default_factory=dict)
    reopens: dict[str, datetime] = field(default_factory=dict)

    def all(self) -> list[Claim]:
        """Every task claimed."""
        return [claim for claims in self.tasks.values() for claim in claims]


def claim_queues(
    conn: Connection,
    owner: str,
    free: Mapping[str | None, int],
    *,
    lease_seconds: float,
    now: datetime | None,
    rates: Mapping[str, RateLimit] | None = None,
    closed: Collection[str] = (),
) -> Claimed:
    """One claim per queue with free slots (`None`: any queue), in one transaction.

    A rate-limited queue (`rates`) is claimed apart, first, and no further than its
    allowance (`store.ratelimits`); `closed` ones, known to have none left, not at all. The
    claim of any queue leaves the limited ones out, so their waiting tasks never take the
    slots of other queues' work. With no limits the claims are exactly the unlimited ones.
    """
    rates = rates or {}
    claimed = Claimed()
    left = {queue: slots for queue, slots in free.items() if slots > 0}
    # The limited queues this runner claims, in the order of their names (the order their
    # locks are taken in on PostgreSQL), each from its own slots or from the shared ones.
    for queue in sorted(rates):
        pool = queue if queue in left else ALL_QUEUES
        if queue in closed or left.get(pool, 0) <= 0:
            continue
        taken = claim_limited(
            conn,
            owner,
            left[pool],
            queue=queue,
            rate=rates[queue],
            lease_seconds=lease_seconds,
            now=now,
        )
        claimed.tasks.setdefault(pool, []).extend(taken.claims)
        left[pool] -= len(taken.claims)
        if taken.reopens_at is not None:
            claimed.reopens[queue] = taken.reopens_at
    for pool, slots in left.items():
        if slots <= 0 or pool in rates:
            continue
        exclude = sorted(rates) if pool is ALL_QUEUES else ()
        claimed.tasks.setdefault(pool, []).extend(
            leases.claim_due(
                conn,
                owner,
                slots,
                lease_seconds=lease_seconds,
                queue=pool,
                exclude=exclude,
                now=now,
            )
        )
    return claimed


@dataclass(slots=True, eq=False)
class Running:
    """A task this runner holds: claimed, running, or run with its outcome not yet written."""

    claim: Claim
    ctx: TaskContext
    now: datetime | None = None  # the clock a test pinned (`Runner.run_once`)
    job: asyncio.Task[None] | None = None  # an async function's task on the loop
    timed_out: float | None = None  # the timeout a sync function ran past
    timer: asyncio.TimerHandle | None = None  # the loop's check for that timeout
    done: bool = False  # its outcome waits for the next cycle
    failures: int = 0  # how many times writing its outcome failed

    @property
    def queue(self) -> str:
        return self.claim.queue


class Pipeline:
    """Claims for free slots, starts what it claimed, and records outcomes, in cycles."""

    def __init__(
        self,
        database: DatabaseThread,
        executor: Executor,
        threads: DaemonPool,
        limits: Mapping[str | None, int],
        *,
        owner: str,
        lease_seconds: float,
        on_finished: Callable[[], None],
        metrics: TaskMetrics,
        rates: Mapping[str, RateLimit] | None = None,
    ) -> None:
        self.database = database
        self.executor = executor
        self.threads = threads
        self.limits = dict(limits)
        self.rates = dict(rates or {})
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.on_finished = on_finished
        self.metrics = metrics
        self.claiming = False  # cycles claim only while the runner accepts work
        # Set while the heartbeat fails: the leases held may have lapsed unseen.
        self.leases_in_doubt = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.running: dict[str, Running] = {}
        self._lock = threading.Lock()
        self._pending: list[tuple[Running, Outcome]] = []
        self._scheduled = False
        self._waiters: list[tuple[set[str], asyncio.Future[None]]] = []
        # Outcomes waiting out a pause before their next try, by the timer that hands them in.
        self._timers: dict[threading.Timer, list[tuple[Running, Outcome]]] = {}
        self._last_cycle = 0.0
        # Limited queues whose allowance ran out, until when: no claim asks for them before,
        # and a timer (armed for the time in `_armed`) wakes the cycle that will.
        self._reopens: dict[str, datetime] = {}
        self._armed: dict[str, datetime] = {}
        self._ran_dry = True  # nothing claimed yet: waiting for work
        # After a cycle failed, claims wait out this back-off (outcomes keep their own
        # retries, `RECORD_RETRIES`); a timer wakes the first cycle past it.
        self._backoff = Backoff(f"runner {owner}: claim")
        # Inline (the test kit's drain), reports wait for their attempt's outcome.
        self.progress = ProgressKeeper(None if database.inline else self._flush_later)

    # -- from any thread -------------------------------------------------------------------

    def wake(self) -> None:
        """Run a cycle soon (one is enough for any number of calls until it starts)."""
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        if not self.database.submit(self._cycle):
            with self._lock:
                self._scheduled = False

    def waiting(self) -> bool:
        """Whether only a wake would make the runner claim soon: no cycle is due, and the
        last claim found less than it had room for. (A claim that filled every free slot
        claims again when one frees.) Read without the lock: a stale answer costs one look
        of the doorbell, two milliseconds."""
        return self._ran_dry and not self._scheduled

    def snapshot(self) -> dict[str, Running]:
        """The tasks held right now, by id."""
        with self._lock:
            return dict(self.running)

    def context(self, claim: Claim) -> TaskContext:
        """The context of a claimed task, its progress reports going to `progress`."""
        return self.executor.context(claim, functools.partial(self.progress.report, claim.lease))

    def _flush_later(self, delay: float) -> None:
        """Write the progress reports held in `delay` seconds (from any thread)."""
        if self.loop is None or self.loop.is_closed():
            self._submit_progress()
        else:
            call_on(self.loop, self.loop.call_later, delay, self._submit_progress)

    def _submit_progress(self) -> None:
        if not self.database.submit(self._write_progress):
            self.progress.take()  # stopped: the tasks were released, their reports with them

    def finish(self, entry: Running, outcome: Outcome) -> None:
        """Hand in an attempt's outcome; the next cycle writes it and frees the slot."""
        with self._lock:
            if self.running.get(entry.claim.id) is not entry:
                return  # released meanwhile: the lease is gone, and so is the outcome
            entry.done = True
            timed_out = entry.timed_out
        if timed_out is not None:
            spec = self.executor.spec_of(entry.claim)
            outcome = self.executor.failed(entry.claim, spec, TaskTimeout(timed_out), now=entry.now)
        with self._lock:
            self._pending.append((entry, outcome))
        self.wake()

    def crashed(self, entry: Running, error: BaseException) -> None:
        """The attempt ended in an exception its function's caller let through (a
        BaseException): record it as a failure all the same, so the slot is freed."""
        try:
            outcome = self.executor.failed(entry.claim, None, error, now=entry.now)
        except BaseException:
            log.exception(
                "%s: its failure cannot be recorded; its lease will lapse", attempt_of(entry.claim)
            )
            self._release([entry])
            self.wake()  # a slot is free, and no claim took it
            return
        self.finish(entry, outcome)

    def start(self, claims: list[Claim], now: datetime | None = None) -> list[Running]:
        """Hold the claimed tasks and start their functions."""
        entries = [Running(claim, self.context(claim), now) for claim in claims]
        self.metrics.started(claims)
        with self._lock:
            for entry in entries:
                self.running[entry.claim.id] = entry
        on_loop: list[tuple[Running, float | None, bool]] = []
        for entry in entries:
            spec = self.executor.spec_of(entry.claim)
            if spec is not None and spec.is_async:
                on_loop.append((entry, None, True))
                continue
            if spec is not None and spec.timeout is not None:
                on_loop.append((entry, spec.timeout, False))
            try:
                self.threads.submit(self._work, entry)
            except Exception as error:  # no thread could be started: the attempt fails
                self.crashed(entry, error)
        if on_loop:
            call_on(self.loop, self._launch, on_loop)
        return entries

    # -- on the loop -----------------------------------------------------------------------

    async def settled(self, task_ids: set[str]) -> None:
        """Return once none of these tasks is held any more (outcome written, or released)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            waiting = {task_id for task_id in task_ids if task_id in self.running}
            if not waiting:
                return
            self._waiters.append((waiting, future))
        await future

    def _launch(self, batch: list[tuple[Running, float | None, bool]]) -> None:
        loop = asyncio.get_running_loop()
        for entry, timeout, is_async in batch:
            if is_async:
                entry.job = loop.create_task(self._run_async(entry))
            elif timeout is not None and not entry.done:
                entry.timer = loop.call_later(timeout, self._overdue, entry, timeout)

    async def _run_async(self, entry: Running) -> None:
        try:
            outcome = await self.executor.call_async(entry.claim, entry.ctx, now=entry.now)
        except asyncio.CancelledError:
            raise  # the runner is stopping past its grace: the stop releases the task
        except BaseException as error:
            self.crashed(entry, error)
            return
        self.finish(entry, outcome)

    def _overdue(self, entry: Running, timeout: float) -> None:
        with self._lock:
            if entry.done or self.running.get(entry.claim.id) is not entry:
                return
            entry.timed_out = timeout
        # A thread cannot be killed. Until it returns the attempt is not over: the task keeps
        # its lease (the heartbeat renews it), so no retry runs beside it, and its slot stays
        # taken, so stuck threads cannot pile up.
        log.warning(
            "%s timed out after %gs; waiting for its thread to return",
            attempt_of(entry.claim),
            timeout,
        )
        entry.ctx.stop.request()

    # -- on a worker thread ----------------------------------------------------------------

    def _work(self, entry: Running) -> None:
        try:
            outcome = self.executor.call_sync(entry.claim, entry.ctx, now=entry.now)
        except BaseException as error:  # SystemExit and the like end the attempt, not the thread
            self.crashed(entry, error)
            return
        self.finish(entry, outcome)

    # -- on the database thread ------------------------------------------------------------

    def _cycle(self) -> None:
        if self._ran_dry:
            # The last claim found less than it had room for: work trickles in. Let it
            # gather for what is left of GATHER seconds since that cycle, so that one
            # transaction carries several tasks rather than one each (an idle runner's
            # first cycle, long after its last, starts at once).
            pause = self._last_cycle + GATHER - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        self._last_cycle = time.monotonic()
        with self._lock:
            self._scheduled = False
            batch, self._pending = self._pending, []
            claiming = self.claiming and self._backoff.ready()
            free = self._free(batch) if claiming else {}
        closed = self._closed() if free else set()
        if not batch and not free:
            return
        try:
            with self.database.transaction() as conn:
                self._keep_leases(conn, batch)
                states = record_with_progress(
                    conn,
                    self.progress.take_for([entry.claim.id for entry, _ in batch]),
                    [outcome for _, outcome in batch],
                )
                claimed = claim_queues(
                    conn,
                    self.owner,
                    free,
                    lease_seconds=self.lease_seconds,
                    now=None,
                    rates=self.rates,
                    closed=closed,
                )
        except Exception as error:
            unavailable = as_unavailable(error)
            if isinstance(unavailable, DatabaseFileGone):
                self.claiming = False  # this process takes no more work (the store said why)
            # Its claim did not happen: a timer asks again once the back-off is over, and
            # the doorbell (or a slot freed below) may ask sooner.
            self._ran_dry = True
            self._wake_in(self._backoff.failed(error))
            if len(batch) > 1 and unavailable is None and not isinstance(error, OperationalError):
                # One bad outcome must not hold up the others. (Not when the database is
                # locked or unreachable: each would wait out the same timeout in turn.)
                for item in batch:
                    self._write_alone(*item)
            else:
                self._retry_later(batch)
            return
        self._backoff.succeeded()
        self._ran_dry = any(
            len(claimed.tasks.get(queue, ())) < slots for queue, slots in free.items()
        )
        try:
            with self._lock:
                self._reopens.update(claimed.reopens)
            self._closed()  # arms the timers of the queues that just closed
            self._written(batch, states)
            for claims in claimed.tasks.values():
                if claims:
                    self.start(claims)
        except Exception:
            log.exception("runner %s: after a cycle's commit", self.owner)

    def _write_progress(self) -> None:
        reports = self.progress.take()
        if not reports:
            return
        try:
            with self.database.transaction() as conn:
                record_progress(conn, reports)
        except Exception:
            log.exception("runner %s: writing %d progress reports failed", self.owner, len(reports))

    def flush(self) -> None:
        """Write the outcomes handed in so far, now (on the database thread)."""
        self._cycle()

    def _keep_leases(self, conn: Connection, batch: list[tuple[Running, Outcome]]) -> None:
        """Renew the leases that may have lapsed while the database could not take writes
        (an outcome whose write failed before, or any while the heartbeat fails): the write
        is fenced by the lease."""
        doubt = self.leases_in_doubt
        late = [entry.claim.lease for entry, _ in batch if doubt or entry.failures]
        if late:
            leases.renew_held(conn, late, lease_seconds=self.lease_seconds)

    def _written(
        self, batch: list[tuple[Running, Outcome]], states: list[TaskStatus | None]
    ) -> None:
        written = [
            (entry.claim, outcome, state)
            for (entry, outcome), state in zip(batch, states, strict=True)
        ]
        for claim, outcome, state in written:
            report(claim, outcome, state)
        self.metrics.finished(written)
        self._release([entry for entry, _ in batch])
        if batch:
            self.on_finished()

    def _write_alone(self, entry: Running, outcome: Outcome) -> None:
        try:
            with self.database.transaction() as conn:
                self._keep_leases(conn, [(entry, outcome)])
                states = record_with_progress(
                    conn, self.progress.take_for([entry.claim.id]), [outcome]
                )
        except Exception as error:
            if as_unavailable(error) is None:
                log.exception("%s: writing the outcome failed", attempt_of(entry.claim))
            self._retry_later([(entry, outcome)])
            return
        self._written([(entry, outcome)], states)
        self.wake()  # a slot is free, and no claim took it

    def _free(self, written: list[tuple[Running, Outcome]]) -> dict[str | None, int]:
        """Free slots per queue, counting those of the outcomes about to be written."""
        busy = dict.fromkeys(self.limits, 0)
        for entry in self.running.values():
            key = ALL_QUEUES if ALL_QUEUES in self.limits else entry.queue
            busy[key] = busy.get(key, 0) + 1
        for entry, _ in written:
            key = ALL_QUEUES if ALL_QUEUES in self.limits else entry.queue
            busy[key] -= 1
        return {
            queue: limit - busy[queue]
            for queue, limit in self.limits.items()
            if limit > busy[queue]
        }

    def _retry_later(self, batch: list[tuple[Running, Outcome]]) -> None:
        """Hand the outcomes in again after their next pause (the last pause repeats while
        the runner runs: an outcome is never given up)."""
        if not batch:
            return
        for entry, _ in batch:
            entry.failures += 1
            if entry.failures == 1:
                log.warning(
                    "%s: its outcome is not written yet; trying again, the task kept",
                    attempt_of(entry.claim),
                )
        tries = max(entry.failures for entry, _ in batch)
        delay = RECORD_RETRIES[min(tries, len(RECORD_RETRIES)) - 1]
        timer = threading.Timer(delay, lambda: self._retry(timer))
        timer.daemon = True
        with self._lock:
            self._timers[timer] = batch
        timer.start()

    def _wake_in(self, delay: float) -> None:
        """Run a cycle in `delay` seconds (a daemon timer, cancelled by `close`)."""

        def fire() -> None:
            with self._lock:
                self._timers.pop(timer, None)
            self.wake()

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            self._timers[timer] = []
        timer.start()

    def _closed(self) -> set[str]:
        """The limited queues with no allowance left now (on the database thread). Each has
        a timer armed for the moment it reopens: one timer per closing, armed again should
        it fire early (its clock is not the wall clock the store reckons with)."""
        now = utcnow()
        arm: list[tuple[str, datetime]] = []
        with self._lock:
            for queue, when in list(self._reopens.items()):
                if when <= now:
                    del self._reopens[queue]
                elif self._armed.get(queue) != when:
                    self._armed[queue] = when
                    arm.append((queue, when))
            closed = set(self._reopens)
        for queue, when in arm:
            self._wake_at(queue, when, (when - now).total_seconds())
        return closed

    def _wake_at(self, queue: str, when: datetime, delay: float) -> None:
        """Run a cycle once `queue` reopens, at `when`, `delay` seconds from now."""

        def fire() -> None:
            with self._lock:
                self._timers.pop(timer, None)
                if self._armed.get(queue) == when:
                    del self._armed[queue]
            self.wake()

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        with self._lock:
            self._timers[timer] = []
        timer.start()

    def _retry(self, timer: threading.Timer) -> None:
        with self._lock:
            batch = self._timers.pop(timer, None)
            if batch is None:
                return  # cancelled by `close`
            self._pending.extend(
                (entry, outcome)
                for entry, outcome in batch
                if self.running.get(entry.claim.id) is entry
            )
        self.wake()

    def close(self) -> None:
        """Cancel the pending retries of outcomes (a stopping runner releases their tasks)
        and the wake-ups of limited queues."""
        with self._lock:
            timers, self._timers = self._timers, {}
            self._armed.clear()  # a runner started again arms its reopenings anew
        for timer in timers:
            timer.cancel()

    def _release(self, entries: list[Running]) -> None:
        """Forget these tasks (their outcome is written, or they were given back)."""
        settled: list[asyncio.Future[None]] = []
        with self._lock:
            for entry in entries:
                if self.running.get(entry.claim.id) is entry:
                    del self.running[entry.claim.id]
                if entry.timer is not None:
                    call_on(self.loop, entry.timer.cancel)
            if self._waiters:
                gone = {entry.claim.id for entry in entries}
                still: list[tuple[set[str], asyncio.Future[None]]] = []
                for waiting, future in self._waiters:
                    waiting -= gone
                    if waiting:
                        still.append((waiting, future))
                    else:
                        settled.append(future)
                self._waiters = still
        for future in settled:
            call_on(self.loop, _resolve, future)

    def forget(self, entries: list[Running]) -> None:
        """Forget tasks that were given back to the queue (a graceful stop released them)."""
        self._release(entries)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
