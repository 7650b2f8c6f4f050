"""Backstop: durable background tasks for FastAPI services.

from app import task, DurableTasks, TaskContext
"""

from app.context import TaskContext
from app.deps import DurableTasks
from app.registry import task

__all__ = ["DurableTasks", "TaskContext", "task"]
