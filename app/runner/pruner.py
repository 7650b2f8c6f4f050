"""Retention: finished tasks (and their attempts) are deleted once past their age.

Succeeded and cancelled tasks are kept `retain_succeeded` seconds after they finish, failed
ones `retain_failed` seconds (longer by default: they are the ones someone may still look
into or retry). Every runner process prunes every `prune_interval` seconds. Several
processes pruning at once is harmless: a delete of what is already gone deletes nothing, and
each batch deletes only rows that are past their age when it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from app.settings import Settings
from store.models import TaskStatus
from store.retention import prune_finished
from store.timeutil import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH = 500
# The pause between two batches. Another connection that wants to write (an enqueue) waits
# in SQLite's busy handler, which looks at the lock again every 100 ms at worst: a pause at
# least that long lets every waiting writer in before the next batch takes the lock again.
PAUSE = 0.1


class Writer(Protocol):
    """Runs `fn(conn, ...)` in a write transaction of its own (`Runner.write`)."""

    def __call__(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Awaitable[T]: ...


class Pruner:
    """Deletes finished tasks past their retention age, one small transaction per batch."""

    def __init__(
        self,
        write: Writer,
        settings: Settings,
        *,
        batch: int = BATCH,
        pause: float = PAUSE,
    ) -> None:
        self._write = write
        self._ages = {
            TaskStatus.SUCCEEDED: timedelta(seconds=settings.retain_succeeded),
            TaskStatus.CANCELLED: timedelta(seconds=settings.retain_succeeded),
            TaskStatus.FAILED: timedelta(seconds=settings.retain_failed),
        }
        self._batch = batch
        self._pause = pause

    async def prune(self, now: datetime | None = None) -> dict[str, int]:
        """Delete every finished task past its age as of `now`; how many, per state."""
        now = now or utcnow()
        pruned: dict[str, int] = {}
        deleting = False
        for status, age in self._ages.items():
            pruned[status.value] = 0
            while True:
                if deleting:
                    # Each batch is its own transaction: between two of them the write lock
                    # is free, and the pause lets this process's claims and other
                    # processes' enqueues take it before the next batch does.
                    await asyncio.sleep(self._pause)
                count = await self._write(prune_finished, status, now - age, limit=self._batch)
                pruned[status.value] += count
                deleting = count > 0
                if count < self._batch:
                    break
        total = sum(pruned.values())
        if total:
            details = ", ".join(f"{count} {state}" for state, count in pruned.items() if count)
            log.info("pruned %d finished tasks past their age (%s)", total, details)
        return pruned

    async def run(self) -> None:
        """The periodic job: prune. A failure is the runner's to log and retry (with
        back-off, see `app.runner.backoff`)."""
        try:
            await self.prune()
        except asyncio.CancelledError:
            # The runner stopped mid-prune (APScheduler cancels its jobs at shutdown, then
            # swallows the error anyway): committed batches stay deleted, the rest is for the
            # next start.
            log.info("pruning interrupted by shutdown")
