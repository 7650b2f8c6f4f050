"""Progress that running tasks report (`ctx.progress`), held in memory and written in batches.

A task may report in a tight loop; the database hears of it at most once every `INTERVAL`
seconds per runner, one statement for every task that reported meanwhile, and always gets
the latest value: a report that finds a write done less than `INTERVAL` ago waits for the
flush it arranges then (on the runner's database thread), and the outcome of an attempt is
written after that attempt's last report, in the same transaction.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from sqlalchemy.engine import Connection

from store import outcomes as store_outcomes
from store.models import Lease, TaskStatus
from store.outcomes import Outcome
from store.progress import record_progress

# Seconds between two progress writes of one runner.
INTERVAL = 0.25

Report = tuple[Lease, dict[str, Any]]


class ProgressKeeper:
    """The latest report of each running task not yet written, and when to write them.

    `flush_later(delay)` arranges for `take()` to be written after `delay` seconds (the
    runner's loop and database thread); without one (the inline runner) reports wait for
    their attempt's outcome. Thread-safe: reports come from task threads and the loop."""

    def __init__(self, flush_later: Callable[[float], None] | None = None) -> None:
        self.flush_later = flush_later
        self._lock = threading.Lock()
        self._pending: dict[str, Report] = {}
        self._scheduled = False
        self._due = 0.0  # when the flush arranged last is due (monotonic)
        self._last = -math.inf

    def report(self, lease: Lease, value: dict[str, Any]) -> None:
        """Hold `value` as the task's latest progress; arrange a write if none is."""
        now = time.monotonic()
        with self._lock:
            self._pending[lease.task_id] = (lease, value)
            # A flush is due within INTERVAL: one arranged long before never came (the loop
            # it was arranged on stopped), so arrange another.
            if self.flush_later is None or (self._scheduled and now < self._due + INTERVAL):
                return
            self._scheduled = True
            self._due = max(now, self._last + INTERVAL)
            delay = self._due - now
        self.flush_later(delay)

    def take(self) -> list[Report]:
        """Every report not yet written (the caller writes them now)."""
        with self._lock:
            taken, self._pending = list(self._pending.values()), {}
            self._scheduled = False
            self._last = time.monotonic()
        return taken

    def take_for(self, task_ids: Collection[str]) -> list[Report]:
        """The reports of these tasks not yet written: their attempts ended."""
        with self._lock:
            return [
                report
                for task_id in task_ids
                if (report := self._pending.pop(task_id, None)) is not None
            ]


def record_with_progress(
    conn: Connection, reports: Sequence[Report], outcomes: Sequence[Outcome]
) -> list[TaskStatus | None]:
    """Write the attempts' last progress, then their outcomes (`store.outcomes.record`)."""
    record_progress(conn, reports)
    return store_outcomes.record(conn, outcomes)
