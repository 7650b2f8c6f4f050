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
