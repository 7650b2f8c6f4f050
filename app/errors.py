"""Errors of the service layer; `app.api.handlers` turns them (and the store's) into answers."""

from __future__ import annotations

from collections.abc import Iterable

from store.models import Task


class BackstopError(Exception):
    """Base class of every error a caller can cause with bad input."""


class UnknownTask(BackstopError):
    """No task is registered under this name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown task {name!r}; known tasks: {', '.join(self.known) or 'none'}")


class TaskSwitchedOff(UnknownTask):
    """A built-in task that this process's settings switch off (`BACKSTOP_BUILTINS`)."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        BackstopError.__init__(
            self,
            f"task {name!r} is switched off here (BACKSTOP_BUILTINS);"
            f" known tasks: {', '.join(self.known) or 'none'}",
        )


class NotATask(BackstopError):
    """A function passed to `add_task` that was never decorated with `@task`."""

    def __init__(self, fn: object) -> None:
        name = getattr(fn, "__qualname__", repr(fn))
        super().__init__(f"{name} is not a registered task: decorate it with @task")


class InvalidArguments(BackstopError):
    """Arguments that do not fit a task's signature or types, or are not JSON."""

    def __init__(self, task: str, problem: str) -> None:
        self.task = task
        self.problem = problem
        super().__init__(f"bad arguments for task {task!r}: {problem}")


class UnreadableArguments(InvalidArguments):
    """Stored arguments of the wrong shape (a row written by hand): no attempt can run them,
    so the task fails without a retry."""


class SessionOnAnotherDatabase(BackstopError):
    """A session passed to `add_task` that is bound to another database than Backstop's: the
    task would be committed where no runner of this Backstop looks."""

    def __init__(self, session_url: str, backstop_url: str) -> None:
        super().__init__(
            f"the session is on {session_url}, Backstop on {backstop_url}: a task enqueued in"
            " a session must share Backstop's database (point both at one URL)"
        )


class InvalidSchedule(BackstopError):
    """A `delay`/`run_at`/option combination that cannot be scheduled."""


class TaskDefinitionError(BackstopError):
    """A `@task` declaration that cannot work (a reserved parameter, a name taken twice)."""


class TaskModuleError(BackstopError):
    """A module named in BACKSTOP_TASK_MODULES that cannot be imported."""


class TaskFailed(Exception):
    """`TaskClient.wait`: the task ended without a result (failed, or cancelled: see
    `TaskCancelled`); `task` is the task as it ended, `last_error` its last error.

    Not a `BackstopError`: the caller's input was fine, the task's own work failed."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.task_id: str = task.id
        self.status: str = str(task.status)
        self.last_error: str | None = task.last_error
        reason = f": {self.last_error}" if self.last_error else ""
        super().__init__(f"task {self.task_id} ({task.name}) {self.status}{reason}")


class TaskCancelled(TaskFailed):
    """`TaskClient.wait`: the task was cancelled."""


class WaitTimeout(TimeoutError):
    """`TaskClient.wait`: the task did not finish within the time given; `task` is the task
    as it was then."""

    def __init__(self, task: Task, timeout: float) -> None:
        self.task = task
        self.task_id: str = task.id
        self.status: str = str(task.status)
        self.timeout = timeout
        super().__init__(
            f"task {self.task_id} ({task.name}) is still {self.status} after {timeout:g}s"
        )
