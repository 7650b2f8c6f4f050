"""What a running task can know about itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from threading import Event

from app.settings import Settings


@dataclass
class TaskContext:
    """Filled in by the runner for a parameter annotated `TaskContext`; never passed by callers.

    `attempt` is 1 for the first attempt (and again after an explicit retry). A function that
    must not repeat a side effect keys it on `task_id`, and on `attempt > 1` checks whether
    an earlier attempt already did it.
    """

    task_id: str
    attempt: int
    settings: Settings
    _stop: Event = field(default_factory=Event, repr=False)
    _on_stop: list[Callable[[], object]] = field(default_factory=list, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once the task should stop: it was cancelled, timed out, lost its lease, or
        its runner is shutting down past its grace. Long sync functions should check it."""
        return self._stop.is_set()

    def _request_stop(self) -> None:
        """Runner side: flag the stop and interrupt an async function (it gets cancelled)."""
        if self._stop.is_set():
            return
        self._stop.set()
        for stop in self._on_stop:
            stop()
