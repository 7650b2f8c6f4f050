"""The HTTP API's request and response bodies.

Each is named `Backstop...` in the OpenAPI document (its `__qualname__`, which pydantic names
schemas after): in a team's app, a model of theirs called `TaskOut` would otherwise clash
with Backstop's, and FastAPI would rename both, breaking the team's generated clients.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from store.jsonvalues import escaped, escaped_text
from store.models import Attempt, AttemptOutcome, Task, TaskStatus
from store.ratelimits import QueueUse
from store.stats import QueueStats
from store.tasks import NewTask, stored_row
from store.timeutil import UnreadableTime, stored_text

_UNREADABLE_NULL = "Null only when the stored value is not of its type (see `unreadable`)"
_UNREADABLE = (
    "Null, unless the row holds values that are not of their column's type (written by hand):"
    " then each such field's name and the value stored, as text; the field itself is null"
)


def unreadable(values: dict[str, Any], checked: dict[str, type | tuple[type, ...]]) -> Any:
    """Set each of `values` (a row about to be shown) that is not of its type in `checked`
    to None, and return their stored values as text by name (None when all were of their
    type): nothing stored may make a read fail, and a client must tell a value that was
    never set from one that could not be read."""
    found: dict[str, str] = {}
    for name, kind in checked.items():
        value = values[name]
        if isinstance(value, kind) and not isinstance(value, UnreadableTime | bool):
            continue
        stored = value.stored if isinstance(value, UnreadableTime) else value
        found[name] = escaped_text(stored_text(stored))
        values[name] = None
    return found or None


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
    unique_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="While a task with this key is queued, running or retrying, answer it"
        " (200) instead of storing a new one",
    )
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
    status: TaskStatus | None = Field(description=_UNREADABLE_NULL)
    queue: str
    priority: int | None = Field(description=_UNREADABLE_NULL)
    args: list[Any]
    kwargs: dict[str, Any]
    attempts: int | None = Field(description=_UNREADABLE_NULL)
    max_attempts: int | None = Field(description=_UNREADABLE_NULL)
    created_at: datetime | None = Field(description=_UNREADABLE_NULL)
    scheduled_at: datetime | None = Field(description=_UNREADABLE_NULL)
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    last_error: str | None
    idempotency_key: str | None
    unique_key: str | None = Field(description="Held while the task is queued, running or retrying")
    progress: ProgressOut | None = Field(
        default=None, description="Set by `ctx.progress()`; null until the attempt reports"
    )
    after: list[str] = Field(
        default_factory=list,
        description="The tasks this one runs after (`after=`); empty when none",
    )
    waiting_on: int | None = Field(
        default=0,
        description="How many of those have not succeeded yet (queued until 0). "
        + _UNREADABLE_NULL,
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

    unreadable: dict[str, str] | None = Field(default=None, description=_UNREADABLE)

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
            value = values[name]
            values[name] = escaped(stored_text(value) if isinstance(value, bytes) else value)
        values["unreadable"] = unreadable(values, _CHECKED)
        return cls.model_validate(values)

    @classmethod
    def queued(cls, new: NewTask, now: datetime) -> TaskOut:
        """The task `new` as enqueued at `now`, without building the `Task` model first
        (it costs more than this whole answer)."""
        return cls.model_validate(stored_row(new, now))


_SHOWN = tuple(name for name in TaskOut.model_fields if name != "unreadable")
# The values shown as they are stored, escaped when they need it.
_TEXT = (
    "id",
    "name",
    "queue",
    "result",
    "last_error",
    "idempotency_key",
    "unique_key",
    "parent_id",
)
# The values that may not be of their type in a row written by hand, and the type each
# must be to be shown (a time that is not one is read as an `UnreadableTime`).
_CHECKED: dict[str, type | tuple[type, ...]] = {
    "status": TaskStatus,
    "priority": int,
    "attempts": int,
    "max_attempts": int,
    "waiting_on": int,
    "created_at": datetime,
    "scheduled_at": datetime,
    "started_at": (datetime, type(None)),
    "finished_at": (datetime, type(None)),
}


class TaskPageOut(BaseModel):
    """`GET /tasks`: one page, newest first, and the cursor of the next page."""

    __qualname__ = "BackstopTaskPageOut"  # its schema's name: see the module docstring

    items: list[TaskOut]
    next_cursor: str | None


class AttemptOut(BaseModel):
    """One attempt at a task."""

    __qualname__ = "BackstopAttemptOut"  # its schema's name: see the module docstring

    number: int | None = Field(description=_UNREADABLE_NULL)
    started_at: datetime | None = Field(description=_UNREADABLE_NULL)
    finished_at: datetime | None
    outcome: AttemptOutcome | None
    error: str | None
    traceback: str | None
    worker: str
    unreadable: dict[str, str] | None = Field(default=None, description=_UNREADABLE)

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptOut:
        """The attempt as shown; its values escaped, or null and under `unreadable` (as
        `TaskOut.of` shows a task's)."""
        values = {name: getattr(attempt, name) for name in _ATTEMPT_SHOWN}
        for name in ("error", "traceback", "worker"):
            value = values[name]
            values[name] = escaped(stored_text(value) if isinstance(value, bytes) else value)
        values["unreadable"] = unreadable(values, _ATTEMPT_CHECKED)
        return cls.model_validate(values)


_ATTEMPT_SHOWN = tuple(name for name in AttemptOut.model_fields if name != "unreadable")
_ATTEMPT_CHECKED: dict[str, type | tuple[type, ...]] = {
    "number": int,
    "started_at": datetime,
    "finished_at": (datetime, type(None)),
    "outcome": (AttemptOutcome, type(None)),
}


class RateLimitOut(BaseModel):
    """A rate-limited queue in `GET /tasks/stats`: its limit and how much of it is in use."""

    __qualname__ = "BackstopRateLimitOut"  # its schema's name: see the module docstring

    limit: str = Field(description="The limit as written in BACKSTOP_RATE_LIMITS, e.g. 4/10s")
    starts: int = Field(description="The starts allowed in any period")
    period_seconds: float
    started: int = Field(
        description="The queue's starts in the last period, by every process (the database's count)"
    )
    reopens_at: datetime | None = Field(
        description="When the next start is allowed, if none is now (null: one is)"
    )

    @classmethod
    def of(cls, use: QueueUse) -> RateLimitOut:
        return cls(
            limit=str(use.limit),
            starts=use.limit.starts,
            period_seconds=use.limit.period.total_seconds(),
            started=use.started,
            reopens_at=use.reopens_at,
        )


class StatsOut(BaseModel):
    """`GET /tasks/stats`."""

    __qualname__ = "BackstopStatsOut"  # its schema's name: see the module docstring

    counts: dict[TaskStatus, int]
    queues: dict[str, dict[TaskStatus, int]]
    oldest_due_seconds: float | None = Field(
        description="How long the oldest due, unclaimed task has waited (null: none waits)"
    )
    rate_limits: dict[str, RateLimitOut] = Field(
        default_factory=dict,
        description="The rate-limited queues, as this process's BACKSTOP_RATE_LIMITS sets them",
    )

    @classmethod
    def of(cls, stats: QueueStats, use: Mapping[str, QueueUse]) -> StatsOut:
        return cls(
            counts=stats.counts,
            queues=stats.queues,
            oldest_due_seconds=stats.oldest_due_seconds,
            rate_limits={queue: RateLimitOut.of(used) for queue, used in use.items()},
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
    409: {
        "model": ErrorOut,
        "description": "The task's state does not allow this (or, for a retry, another active"
        " task holds its unique key)",
    },
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
