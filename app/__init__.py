"""Backstop: durable background tasks for FastAPI services.

from app import Backstop, DurableTasks, TaskContext, task
"""

from app.api.deps import DurableTasks
from app.backstop import Backstop
from app.tasks.context import TaskContext
from app.tasks.registry import task

__all__ = ["Backstop", "DurableTasks", "TaskContext", "task"]
