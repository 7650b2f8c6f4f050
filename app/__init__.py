"""Backstop: durable background tasks for FastAPI services.

from app import task, DurableTasks, TaskContext
"""

from app.api.deps import DurableTasks
from app.tasks.context import TaskContext
from app.tasks.registry import task

__all__ = ["DurableTasks", "TaskContext", "task"]
