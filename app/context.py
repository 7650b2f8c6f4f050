"""What a running task can know about itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from threading import Event

from app.settings import Settings


@dataclass
class TaskContext:
    """Filled in by the runner for a parameter annotated `TaskContext`; never passed by callers.

    `attempt` is 1 for the first attempt: a function that must not repeat a side effect can
    key it on `(task_id, attempt)` or check whether an earlier attempt already did it.
    """

    task_id: str
    attempt: int
    settings: Settings
    _cancel: Event = field(default_factory=Event, repr=False)

    @property
    def cancelled(self) -> bool:
        """True once the task was asked to stop (a timeout, or a shutdown past its grace)."""
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the function to stop; sync functions see it through `cancelled`."""
        self._cancel.set()
