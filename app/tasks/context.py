"""What a running task can know about itself."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from threading import Event, Lock
from typing import Any, Protocol, Self, TypeVar

from app.settings import Settings
from store.tasks import NewTask

G = TypeVar("G")


class Planner(Protocol):
    """Checks a follow-up as `add_task` checks a task, and gives the row to store: what the
    runner gives a context (`app.runner.execution.Executor`)."""

    def __call__(
        self,
        fn: Callable[..., Any] | str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        *,
        delay: float | None,
        run_at: datetime | None,
        queue: str | None,
        priority: int | None,
        max_attempts: int | None,
        after: Sequence[str] | None,
    ) -> NewTask: ...


# A progress message longer than this is cut: progress is a status line, not a log.
MAX_MESSAGE = 500


class Grant(Protocol):
    """A piece of configuration a task asks for by name (`@task(grants=[SmtpServer])`):
    the runner builds it from the settings and hands it to that task's context alone."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Self: ...


@dataclass(frozen=True)
class TaskSettings:
    """What every task may read of the settings: where the service keeps its files.
    Nothing secret: the API token and the SMTP login are not here."""

    data_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> TaskSettings:
        return cls(data_dir=settings.data_dir)

    @property
    def logs_dir(self) -> Path:
        """Where `log.append` writes."""
        return self.data_dir / "logs"


class StopRequest:
    """The runner's word to a running task that it should stop, and the callbacks that carry
    it into an async function (which is cancelled). Thread-safe: a cancel arrives from the
    event loop while a sync function polls `TaskContext.cancelled` in its thread."""

    def __init__(self) -> None:
        self._event = Event()
        self._lock = Lock()
        self._callbacks: list[Callable[[], object]] = []

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()

    def flag(self) -> None:
        """Ask for a stop without interrupting anything: a sync function sees it when it
        next looks."""
        self._event.set()

    def request(self) -> None:
        """Ask for a stop and interrupt the function (each callback runs once)."""
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], object]) -> None:
        """Call `callback` when a stop is requested (the executor cancels its asyncio task)."""
        with self._lock:
            self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], object]) -> None:
        """Stop calling `callback`: the function it interrupts has returned."""
        with self._lock:
            self._callbacks.remove(callback)


def progress_value(done: float, total: float | None, message: str | None) -> dict[str, Any]:
    """The stored form of a report, checked: finite numbers, a message of text."""
    for name, number in (("done", done), ("total", total)):
        if number is None and name == "total":
            continue
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise TypeError(f"progress {name} must be a number, not {type(number).__name__}")
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"progress {name} must be finite, not {number}")
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(f"progress message must be text, not {type(message).__name__}")
        # What UTF-8 cannot carry (a lone surrogate) is replaced, not refused.
        message = message[:MAX_MESSAGE].encode("utf-8", "replace").decode("utf-8")
    return {"done": done, "total": total, "message": message}


@dataclass
class TaskContext:
    """Filled in by the runner for a parameter annotated `TaskContext`; never passed by callers.

    `attempt` is 1 for the first attempt (and again after an explicit retry). A function that
    must not repeat a side effect keys it on `task_id`, and on `attempt > 1` checks whether
    an earlier attempt already did it.
    """

    task_id: str
    attempt: int
    settings: TaskSettings
    stop: StopRequest = field(default_factory=StopRequest, repr=False)
    # What the task's `@task(grants=...)` asked for, by type; nothing for other tasks.
    grants: Mapping[type[Any], Any] = field(default_factory=dict, repr=False)
    # Where `progress` hands its checked value: the runner's `ProgressKeeper`.
    reporter: Callable[[dict[str, Any]], None] = field(default=lambda value: None, repr=False)
    # Where `add_task` has a follow-up checked; None: this context cannot add any.
    planner: Planner | None = field(default=None, repr=False)
    _follow_ups: list[NewTask] = field(default_factory=list, repr=False)
    _adding: Lock = field(default_factory=Lock, repr=False)

    def add_task(
        self,
        fn: Callable[..., Any] | str,
        /,
        *args: Any,
        delay: float | None = None,
        run_at: datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        after: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Enqueue a follow-up `fn(*args, **kwargs)` with this attempt's success, and return
        its id (fixed now, so the function may return it or name it in another follow-up's
        `after=`). It is stored in the transaction that records the success, so it exists
        once if this attempt succeeds, and not at all if it fails, is cancelled, loses its
        lease or its runner dies (a retry adds its own). Checked here as `add_task` checks
        (an unknown task, arguments that do not fit raise now, failing the attempt); the
        options are `add_task`'s, but for the idempotency key: a follow-up is created once
        already. Its `parent_id` is this task's id."""
        if self.planner is None:
            raise RuntimeError("this context cannot add tasks: it was not made by a runner")
        new = self.planner(
            fn,
            args,
            kwargs,
            delay=delay,
            run_at=run_at,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            after=after,
        )
        with self._adding:
            self._follow_ups.append(new)
        return new.id

    def follow_ups(self) -> tuple[NewTask, ...]:
        """The follow-ups added so far, in order."""
        with self._adding:
            return tuple(self._follow_ups)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Record how far this attempt got: `done` of `total` (in the task's own unit),
        and what it is doing. Call it as often as suits the function: the runner writes
        the latest value at most a few times a second, and always the last one (at the
        latest with the attempt's outcome). Clients see it in `GET /tasks/{id}`, the event
        stream and `backstop tasks show`; the next attempt starts without it."""
        self.reporter(progress_value(done, total, message))

    @property
    def cancelled(self) -> bool:
        """True once the task should stop: it was cancelled, timed out, lost its lease, or
        its runner is shutting down past its grace. Long sync functions should check it."""
        return self.stop.requested

    def grant(self, kind: type[G]) -> G:
        """The `kind` configuration this task was granted by its `@task(grants=[kind])`."""
        try:
            value: G = self.grants[kind]
        except KeyError:
            raise LookupError(
                f"task {self.task_id} was not granted {kind.__name__}: declare it in"
                f" @task(grants=[{kind.__name__}])"
            ) from None
        return value
