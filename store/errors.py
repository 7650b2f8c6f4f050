"""Errors the store raises; `app` turns them into HTTP answers in one place."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every store error."""


class TaskNotFound(StoreError):
    """No task has the given id."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} not found")
        self.task_id = task_id


class InvalidCursor(StoreError):
    """A list cursor that this store did not hand out."""

    def __init__(self, cursor: str) -> None:
        super().__init__(f"invalid cursor {cursor!r}")
        self.cursor = cursor


class InvalidTransition(StoreError):
    """The task's state does not allow what was asked (cancel a finished task, ...)."""

    def __init__(self, task_id: str, status: str, action: str, allowed: str) -> None:
        super().__init__(f"task {task_id!r} is {status}: only {allowed} tasks can be {action}")
        self.task_id = task_id
        self.status = status


class IdempotencyConflict(StoreError):
    """An idempotency key already used for a different request."""

    def __init__(self, key: str, task_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different request (task {task_id})"
        )
        self.key = key
        self.task_id = task_id


class UniqueKeyTaken(StoreError):
    """A task cannot become active again: another active task holds its unique key."""

    def __init__(self, task_id: str, key: str, holder_id: str) -> None:
        super().__init__(
            f"task {task_id!r} cannot be queued again: its unique key {key!r} is held by "
            f"task {holder_id}, which is still active"
        )
        self.task_id = task_id
        self.key = key
        self.holder_id = holder_id


class DatabaseUnavailable(StoreError):
    """The database cannot take a write now (locked, full, unreachable, its file gone); the
    caller may try again later."""

    def __init__(self, reason: str, *, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class WriteTimeout(DatabaseUnavailable):
    """A write not taken within its bound; it was withdrawn and will never be committed."""

    def __init__(self, seconds: float, cause: str | None = None) -> None:
        reason = f"the database did not take the write within {seconds:g}s"
        super().__init__(reason + (f" ({cause})" if cause else ""), retry_after=seconds)
        self.seconds = seconds


class DatabaseFileGone(DatabaseUnavailable):
    """The SQLite file this process opened was deleted or replaced: what it would write
    would land where no other process, and no restart, finds it."""


class UnknownParents(StoreError):
    """`after=` names tasks that do not exist (never did, or were pruned)."""

    def __init__(self, task_ids: list[str]) -> None:
        named = ", ".join(repr(task_id) for task_id in task_ids)
        super().__init__(
            f"after: no task {named}" if len(task_ids) == 1 else f"after: no tasks {named}"
        )
        self.task_ids = task_ids


class ParentNotSucceeded(StoreError):
    """A retry of a task whose parent (`after=`) failed or was cancelled: it could only be
    cancelled again, so the parent is to be retried first."""

    def __init__(self, task_id: str, parent_id: str, status: str) -> None:
        super().__init__(
            f"task {task_id!r} runs after task {parent_id!r}, which is {status}:"
            " retry that one first"
        )
        self.task_id = task_id
        self.parent_id = parent_id
