"""Periodic tasks: every runner process enqueues each due tick, and each tick runs once.

Every runner process (the one in `serve`, each `backstop worker`) checks the schedules about
once a second. Exactly one task per tick, however many processes check at once, rests on
two things in the database: the task's idempotency key names the schedule and the tick, and
its unique constraint stores the first insert and ignores the others; the enqueue and the
schedule's `last_tick` move in one write transaction, so a process that comes second finds
the tick already recorded.

Ticks missed while no runner ran are coalesced: only the latest due tick is enqueued. A
schedule seen for the first time starts from now: its latest past tick is recorded without
running, and the first run is the next tick.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Connection

from app.runner.runner import Runner
from app.tasks.recurrence import tick_key
from app.tasks.registry import Registry, TaskSpec
from store import schedules as store_schedules
from store import tasks as store_tasks
from store.errors import IdempotencyConflict
from store.models import Schedule, Task
from store.tasks import NewTask
from store.timeutil import utcnow

log = logging.getLogger(__name__)

# A tick's task carries no arguments, so its key alone says what was asked for.
_REQUEST_HASH = hashlib.sha256(b"backstop periodic tick").hexdigest()


@dataclass(frozen=True)
class Due:
    """A tick to record for a schedule; `run` is False when it is only the starting point."""

    spec: TaskSpec
    tick: datetime
    run: bool


@dataclass(frozen=True)
class ScheduleInfo:
    """A periodic task as `GET /schedules` and `backstop schedules` show it."""

    name: str
    cron: str | None
    every: float | None
    next_run_at: datetime | None
    last_tick: datetime | None


def periodic_specs(registry: Registry) -> list[TaskSpec]:
    """The registered tasks that have a schedule, by name."""
    return sorted((spec for spec in registry if spec.recurrence is not None), key=_name)


def _name(spec: TaskSpec) -> str:
    return spec.name


def due_ticks(
    specs: Iterable[TaskSpec], schedules: Mapping[str, Schedule], now: datetime
) -> list[Due]:
    """What each schedule has due as of `now`: the latest tick after its last one, if any."""
    due: list[Due] = []
    for spec in specs:
        if spec.recurrence is None:
            continue
        state = schedules.get(spec.name)
        last = state.last_tick if state is not None else None
        tick = spec.recurrence.latest(now, after=last)
        if tick is not None:
            due.append(Due(spec, tick, run=last is not None))
    return due


def schedule_infos(
    specs: Iterable[TaskSpec], schedules: Mapping[str, Schedule], now: datetime
) -> list[ScheduleInfo]:
    """Each schedule with its next run: the tick due now if one is, else the next one."""
    infos: list[ScheduleInfo] = []
    for spec in specs:
        recurrence = spec.recurrence
        if recurrence is None:
            continue
        state = schedules.get(spec.name)
        last = state.last_tick if state is not None else None
        # A schedule not yet seen starts from now, so nothing is due for it before the next tick.
        pending = recurrence.latest(now, after=last) if last is not None else None
        infos.append(
            ScheduleInfo(
                name=spec.name,
                cron=recurrence.cron,
                every=None if recurrence.every is None else recurrence.every.total_seconds(),
                next_run_at=pending or recurrence.next_after(now),
                last_tick=last,
            )
        )
    return infos


def read_schedules(
    conn: Connection, registry: Registry, now: datetime | None = None
) -> list[ScheduleInfo]:
    """Every periodic task of `registry` with its next run as of `now`, by name."""
    return schedule_infos(
        periodic_specs(registry), store_schedules.get_schedules(conn), now or utcnow()
    )


def _anything_due(conn: Connection, specs: list[TaskSpec], now: datetime) -> bool:
    return bool(due_ticks(specs, store_schedules.get_schedules(conn), now))


def enqueue_due(conn: Connection, specs: list[TaskSpec], now: datetime) -> list[Task]:
    """Enqueue each schedule's due tick and record it; the tasks this call stored.

    Run it in one write transaction: the schedules are read again inside it, so a tick that
    another process recorded meanwhile is not due any more, and should two processes still
    enqueue one tick, the key's unique constraint keeps one task.
    """
    created: list[Task] = []
    for due in due_ticks(specs, store_schedules.get_schedules(conn), now):
        if due.run:
            try:
                task, stored = store_tasks.enqueue_once(
                    conn, tick_task(due.spec, due.tick), now=now
                )
            except IdempotencyConflict as conflict:
                # Someone enqueued another request under this tick's key: skip the tick
                # rather than retry it forever and hold up every other schedule.
                log.warning("periodic %s: tick %s skipped: %s", due.spec.name, due.tick, conflict)
                stored = False
            if stored:
                created.append(task)
        store_schedules.advance_schedule(conn, due.spec.name, due.tick, now=now)
    return created


def tick_task(spec: TaskSpec, tick: datetime) -> NewTask:
    """The task a schedule's tick enqueues: due at the tick, under the tick's own key."""
    return NewTask(
        name=spec.name,
        queue=spec.queue,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        scheduled_at=tick,
        idempotency_key=tick_key(spec.name, tick),
        request_hash=_REQUEST_HASH,
    )


class Periodic:
    """Enqueues the periodic tasks of a registry through a runner's database thread."""

    def __init__(self, registry: Registry, runner: Runner) -> None:
        self.registry = registry
        self.runner = runner

    async def tick(self, now: datetime | None = None) -> list[Task]:
        """Enqueue what is due as of `now` (once per tick across processes); the new tasks."""
        specs = periodic_specs(self.registry)
        if not specs:
            return []
        now = now or utcnow()
        # A read first: it takes no lock, and nearly always finds nothing due.
        if not await self.runner.read(_anything_due, specs, now):
            return []
        created = await self.runner.write(enqueue_due, specs, now)
        for task in created:
            log.info("task %s: enqueued periodic %s for %s", task.id, task.name, task.scheduled_at)
            self.runner.metrics.enqueued(task.name, task.queue)
        if created:
            self.runner.notify()
        return created
