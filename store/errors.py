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
