"""The HTTP API's request and response bodies.

Each is named `Backstop...` in the OpenAPI document (its `__qualname__`, which pydantic names
schemas after): in a team's app, a model of theirs called `TaskOut` would otherwise clash
with Backstop's, and FastAPI would rename both, breaking the team's generated clients.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from store.dependencies import MAX_PARENTS
from store.jsonvalues import escaped
from store.models import Attempt, AttemptOutcome, Task, TaskStatus
from store.tasks import NewTask, stored_row


class TaskIn(BaseModel):
    """`POST /tasks`: what to run and when."""

    __qualname__ = "BackstopTaskIn"  # its schema's name: see the module docstring

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    queue: str | None = Field(default=None, min_length=1, max_length=100)
    priority: int | None = Field(default=None, ge=-1_000_000, le=1_000_000)
    delay: float | None = Field(default=None, ge=0, le=10 * 365 * 86_400, allow_inf_nan=False)
    run_at: AwareDatetime | None = None
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    after: list[Annotated[str, Field(min_length=1, max_length=36)]] | None = Field(
        default=None,
        max_length=MAX_PARENTS,
        description="Ids of tasks this one runs after: it waits until each has succeeded,"
        " and ends cancelled when one fails or is cancelled",
    )


class ProgressOut(BaseModel):
    """How far the running (or last) attempt got, as its function last reported it."""

    __qualname__ = "BackstopProgressOut"  # its schema's name: see the module docstring

    done: int | float = Field(description="The work done so far, in the task's own unit")
    total: int | float | None = Field(description="The whole of the work, when the task knows it")
    message: str | None = Field(description="What the task says it is doing")


# The pydantic mypy plugin reads the field named `kwargs` as a redefinition of `**kwargs`.
class TaskOut(BaseModel):  # type: ignore[no-redef]
    """A task as the API shows it."""

    __qualname__ = "BackstopTaskOut"  # its schema's name: see the module docstring

    id: str
    name: str
    status: TaskStatus
    queue: str
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    attempts: int
    max_attempts: int
    created_at: datetime
    scheduled_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    last_error: str | None
    idempotency_key: str | None
    progress: ProgressOut | None = Field(
        default=None, description="Set by `ctx.progress()`; null until the attempt reports"
    )
    after: list[str] = Field(
        default_factory=list,
        description="The tasks this one runs after (`after=`); empty when none",
    )
    waiting_on: int = Field(
        default=0, description="How many of those have not succeeded yet (queued until 0)"
    )
    parent_id: str | None = Field(
        default=None,
        description="The task whose success enqueued this one (`ctx.add_task`); null for a"
        " task enqueued from outside",
    )

    @field_validator("after", mode="wrap")
    @classmethod
    def _ids_or_empty(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Null when none; written by hand in some other shape: no stored row may make a
        # read fail.
        if value is None:
            return []
        try:
            return escaped(handler(value))
        except ValidationError:
            return []

    @field_validator("progress", mode="wrap")
    @classmethod
    def _progress_or_none(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Written by hand in some other shape: no stored row may make a read fail.
        try:
            return handler(value)
        except ValidationError:
            return None

    @classmethod
    def of(cls, task: Task) -> TaskOut:
        """The task as shown. A row stored before the enqueue checks, or written by hand,
        may hold what JSON in UTF-8 cannot carry, or bytes that are not UTF-8: the value is
        shown escaped (`store.jsonvalues.escaped`). Arguments that are not an array (text
        that is not JSON, say) are shown as an array of that one value, keyword arguments
        that are not an object as `{"": value}` (no parameter has an empty name)."""
        values = {name: getattr(task, name) for name in _SHOWN}
        args, kwargs = values["args"], values["kwargs"]
        values["args"] = escaped(args if isinstance(args, list) else [args], outer=1)
        values["kwargs"] = escaped(kwargs if isinstance(kwargs, dict) else {"": kwargs}, outer=1)
        for name in _TEXT:
            values[name] = escaped(values[name])
        return cls.model_validate(values)

    @classmethod
    def queued(cls, new: NewTask, now: datetime) -> TaskOut:
        """The task `new` as enqueued at `now`, without building the `Task` model first
        (it costs more than this whole answer)."""
        return cls.model_validate(stored_row(new, now))


_SHOWN = tuple(TaskOut.model_fields)
# The values shown as they are stored, escaped when they need it.
_TEXT = ("id", "name", "queue", "result", "last_error", "idempotency_key", "parent_id")


class TaskPageOut(BaseModel):
    """`GET /tasks`: one page, newest first, and the cursor of the next page."""

    __qualname__ = "BackstopTaskPageOut"  # its schema's name: see the module docstring

    items: list[TaskOut]
    next_cursor: str | None


class AttemptOut(BaseModel):
    """One attempt at a task."""

    __qualname__ = "BackstopAttemptOut"  # its schema's name: see the module docstring

    number: int
    started_at: datetime
    finished_at: datetime | None
    outcome: AttemptOutcome | None
    error: str | None
    traceback: str | None
    worker: str

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptOut:
        shown = cls.model_validate(attempt, from_attributes=True)
        shown.error = escaped(shown.error)
        shown.traceback = escaped(shown.traceback)
        shown.worker = escaped(shown.worker)
        return shown


class StatsOut(BaseModel):
    """`GET /tasks/stats`."""

    __qualname__ = "BackstopStatsOut"  # its schema's name: see the module docstring

    counts: dict[TaskStatus, int]
    queues: dict[str, dict[TaskStatus, int]]
    oldest_due_seconds: float | None = Field(
        description="How long the oldest due, unclaimed task has waited (null: none waits)"
    )


class ScheduleOut(BaseModel):
    """`GET /schedules`: one periodic task, declared with `cron` or `every` (the other null)."""

    __qualname__ = "BackstopScheduleOut"  # its schema's name: see the module docstring

    name: str
    cron: str | None = Field(description="Five crontab fields, evaluated in UTC")
    every: float | None = Field(description="The interval in seconds")
    next_run_at: datetime | None = Field(
        description="When it is next enqueued: the tick due now if one is, else the next one"
    )
    last_tick: datetime | None = Field(
        description="The latest tick recorded (null: no runner has seen the schedule yet)"
    )


class ErrorOut(BaseModel):
    """Any refusal but a 422: what is wrong, in one line."""

    __qualname__ = "BackstopError"  # its schema's name: see the module docstring

    detail: str


class ValidationErrorItem(BaseModel):
    """One field a request got wrong, in FastAPI's format (with `input` and `ctx` besides)."""

    __qualname__ = "BackstopValidationErrorItem"  # its schema's name: see the module docstring

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    """A 422: FastAPI's list of errors when the request does not fit its schema, or one line
    when Backstop refuses it (an unknown task, arguments its function cannot take, a bad
    cursor, an `Idempotency-Key` reused with another body)."""

    __qualname__ = "BackstopValidationError"  # its schema's name: see the module docstring

    detail: list[ValidationErrorItem] | str


ANSWERS: dict[int, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "A Content-Length header that is not a number"},
    401: {"model": ErrorOut, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorOut, "description": "No task with this id"},
    409: {"model": ErrorOut, "description": "The task's state does not allow this"},
    413: {"model": ErrorOut, "description": "The request body is over the limit"},
    422: {"model": ValidationErrorOut, "description": "The request is refused"},
    503: {
        "model": ErrorOut,
        "description": "The database cannot take the write now (or, for /readyz, is not"
        " current); nothing of the request is stored",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before sending the request again",
                "schema": {"type": "integer"},
            }
        },
    },
}


def answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can answer `codes`, each with its body."""
    return {code: ANSWERS[code] for code in codes}
