"""The task and attempt tables, and the states a task moves through."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    column,
    desc,
    text,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import configure_mappers
from sqlmodel import Field, SQLModel

from store.timeutil import UTCDateTime


class TaskStatus(StrEnum):
    """A task's state; shared by the table, the API schema and the CLI."""

    # Its name in an OpenAPI document, where a team's own `TaskStatus` must not clash with it.
    __qualname__ = "BackstopTaskStatus"

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
CLAIMABLE = (TaskStatus.QUEUED, TaskStatus.RETRYING)
# The states in which a task holds its `unique_key`: it has not ended yet.
ACTIVE = (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING)


def ended(status: TaskStatus | str) -> bool:
    """Whether a task in `status` has ended. A state written by hand outside the enum (read
    as the stored text) has not: nothing ends or moves it."""
    return status in TERMINAL


class AttemptOutcome(StrEnum):
    """How one attempt ended; `None` on the row while it runs."""

    # Its name in an OpenAPI document, where a team's own `AttemptOutcome` must not clash with it.
    __qualname__ = "BackstopAttemptOutcome"

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LEASE_EXPIRED = "lease_expired"
    RELEASED = "released"
    CANCELLED = "cancelled"


class StoreModel(SQLModel):
    """Base of Backstop's tables: their own metadata, apart from the application's models,
    so a team's `SQLModel.metadata.create_all()` never creates them behind Alembic's back."""

    metadata = MetaData()


def _in(values: Any) -> str:
    return ", ".join(f"'{v.value}'" for v in values)


# The WHERE clauses of the partial indexes, as literal SQL. SQLite uses a partial index only
# when the query carries the same terms with literal values (a bound parameter proves
# nothing), so the claim and the reclaim put these very strings in their WHERE clauses.
# A task that waits on parents (`after=`) is queued but not claimable until `waiting_on`,
# the number of its parents that have not succeeded, is 0: it stays out of the claim's index.
CLAIMABLE_STATUS = f"status IN ({_in(CLAIMABLE)})"
CLAIMABLE_WHERE = f"{CLAIMABLE_STATUS} AND waiting_on = 0"
WAITING_WHERE = "status = 'queued' AND waiting_on > 0"
RUNNING_WHERE = "status = 'running'"
TERMINAL_WHERE = f"status IN ({_in(TERMINAL)})"
# SQLite matches an upsert's conflict target to a partial index only by this same text.
UNIQUE_ACTIVE_WHERE = f"status IN ({_in(ACTIVE)}) AND unique_key IS NOT NULL"


# The pydantic mypy plugin reads the field named `kwargs` as a redefinition of `**kwargs`.
class Task(StoreModel, table=True):  # type: ignore[no-redef]
    """One durable task: what to run, its schedule, its lease and its outcome."""

    __tablename__ = "task"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in(TaskStatus)})", name="ck_task_status"),
        CheckConstraint("attempts >= 0 AND attempts <= max_attempts", name="ck_task_attempts"),
        CheckConstraint("max_attempts >= 1", name="ck_task_max_attempts"),
        CheckConstraint(
            f"status NOT IN ({_in(TERMINAL)}) OR finished_at IS NOT NULL",
            name="ck_task_terminal_finished",
        ),
        CheckConstraint(
            "status <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)",
            name="ck_task_running_leased",
        ),
        # The claim reads this index in order and stops after LIMIT rows: finished history,
        # however large, is not in it, so claiming stays as fast at a million rows as at ten.
        # No other index may lead with `status` for the claimable states, or SQLite's planner
        # (which has no statistics) prefers it and sorts the whole backlog on every claim.
        Index(
            "ix_task_claimable",
            desc(column("priority")),
            "scheduled_at",
            sqlite_where=text(CLAIMABLE_WHERE),
            postgresql_where=text(CLAIMABLE_WHERE),
        ),
        # The claim of a runner that serves named queues, one queue at a time.
        Index(
            "ix_task_claimable_queue",
            "queue",
            desc(column("priority")),
            "scheduled_at",
            sqlite_where=text(CLAIMABLE_WHERE),
            postgresql_where=text(CLAIMABLE_WHERE),
        ),
        # The tasks waiting on their parents, for the counts per queue (`store.stats`).
        Index(
            "ix_task_waiting",
            "queue",
            sqlite_where=text(WAITING_WHERE),
            postgresql_where=text(WAITING_WHERE),
        ),
        Index(
            "ix_task_lease_expiry",
            "lease_expires_at",
            sqlite_where=text(RUNNING_WHERE),
            postgresql_where=text(RUNNING_WHERE),
        ),
        # Listing by a terminal state (`?status=failed`) in a long history. Tasks in the
        # other states are the newest ones, found early by ix_task_created.
        Index(
            "ix_task_finished_status",
            "status",
            "created_at",
            "id",
            sqlite_where=text(TERMINAL_WHERE),
            postgresql_where=text(TERMINAL_WHERE),
        ),
        # Retention prunes each terminal state by age, oldest first.
        Index(
            "ix_task_prune",
            "status",
            "finished_at",
            sqlite_where=text(TERMINAL_WHERE),
            postgresql_where=text(TERMINAL_WHERE),
        ),
        UniqueConstraint("idempotency_key", name="uq_task_idempotency_key"),
        # At most one task that has not ended per `unique_key`: the database settles racing
        # enqueues (in any number of processes), and a finished task frees its key.
        Index(
            "uq_task_unique_key_active",
            "unique_key",
            unique=True,
            sqlite_where=text(UNIQUE_ACTIVE_WHERE),
            postgresql_where=text(UNIQUE_ACTIVE_WHERE),
        ),
        # Unique (as `id` alone is) so that attempts can refer to their task by it.
        Index("ix_task_created", "created_at", "id", unique=True),
        Index("ix_task_name_created", "name", "created_at"),
        Index("ix_task_queue_created", "queue", "created_at"),
    )

    id: str = Field(sa_column=Column(String(36), primary_key=True))
    name: str = Field(sa_type=String(200))
    status: TaskStatus = Field(default=TaskStatus.QUEUED, sa_type=String(16))
    queue: str = Field(default="default", sa_type=String(100))
    priority: int = 0
    args: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    kwargs: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    attempts: int = 0
    max_attempts: int = 5
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    scheduled_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    started_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    result: Any = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    idempotency_key: str | None = Field(default=None, sa_type=String(200))
    lease_owner: str | None = Field(default=None, sa_type=String(200))
    lease_expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    # The fencing token: bumped by every claim, so a runner whose lease lapsed and was taken
    # over can never write an outcome over its successor's.
    lease_token: int = 0
    # How many times a runner died holding this task (its lease lapsed): past a limit the
    # task is taken for a poison pill that kills runners, and fails.
    expirations: int = 0
    # Set by a cancel while the task runs; the runner stops the function and ends it there.
    cancel_requested_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    # A fingerprint of the request that created the task under `idempotency_key`, so the
    # same key with a different request is told apart from a retried one.
    request_hash: str | None = Field(default=None, sa_type=String(64))
    # How far the running attempt got, as its function last reported it (`store.progress`):
    # {"done": n, "total": n or null, "message": text or null}; null until it reports.
    progress: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    # The W3C trace context (`{"traceparent": ..., "tracestate": ...}` as JSON) of the span
    # that enqueued the task, when tracing is on: its attempts' spans join that trace.
    trace_context: str | None = Field(default=None, sa_column=Column(Text))
    # Held while the task is queued, running or retrying (`uq_task_unique_key_active`): an
    # enqueue with a key an active task holds gets that task instead of a new one.
    unique_key: str | None = Field(default=None, sa_type=String(200))
    # The task whose successful attempt enqueued this one (`ctx.add_task`), committed with
    # that success; null for a task enqueued from outside.
    parent_id: str | None = Field(default=None, sa_type=String(36))
    # The tasks this one runs after (`add_task(..., after=[...])`), as a JSON array of ids,
    # in the order given; null when none. `task_dependency` holds the same links, by parent.
    after: list[str] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    # How many of those parents have not succeeded yet: claimable only at 0.
    waiting_on: int = Field(
        default=0, sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    # Set once a task was named in another's `after=`: only then does its success or its
    # end look for dependants, so that the common outcome costs no statement more.
    has_dependants: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, server_default=sa_false())
    )


class TaskDependency(StoreModel, table=True):
    """One link of `after=`: `child_id` runs only once `parent_id` succeeded.

    Read by parent (its success releases the child, its failure cancels it); the child's own
    row counts the parents still pending (`Task.waiting_on`). A task's removal (retention)
    takes its links with it.
    """

    __tablename__ = "task_dependency"
    __table_args__ = (
        PrimaryKeyConstraint("child_id", "parent_id", name="pk_task_dependency"),
        ForeignKeyConstraint(
            ["child_id"], ["task.id"], name="fk_task_dependency_child", ondelete="CASCADE"
        ),
        ForeignKeyConstraint(
            ["parent_id"], ["task.id"], name="fk_task_dependency_parent", ondelete="CASCADE"
        ),
        Index("ix_task_dependency_parent", "parent_id"),
    )

    child_id: str = Field(sa_type=String(36))
    parent_id: str = Field(sa_type=String(36))


class Attempt(StoreModel, table=True):
    """One attempt at a task: when it ran, where, and how it ended."""

    __tablename__ = "attempt"
    __table_args__ = (
        # An attempt refers to its task by the task's creation time, then its id. Task ids are
        # random, so an index led by the id puts each new attempt on a random page of an index
        # as large as the history (a page written to the WAL per task, at a million tasks three
        # times the claim's cost); led by the creation time, new attempts fill the last pages.
        ForeignKeyConstraint(
            ["task_created_at", "task_id"],
            ["task.created_at", "task.id"],
            name="fk_attempt_task",
            ondelete="CASCADE",
        ),
        Index("ix_attempt_task", "task_created_at", "task_id", "number"),
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    task_id: str = Field(sa_column=Column(String(36), nullable=False))
    task_created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    number: int
    started_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    outcome: AttemptOutcome | None = Field(default=None, sa_type=String(16))
    error: str | None = Field(default=None, sa_column=Column(Text))
    traceback: str | None = Field(default=None, sa_column=Column(Text))
    worker: str = Field(sa_type=String(200))


class QueueStart(StoreModel, table=True):
    """One start of a task of a rate-limited queue, kept while a window can still count it
    (`store.ratelimits`). Unlimited queues write nothing here."""

    __tablename__ = "queue_start"
    __table_args__ = (Index("ix_queue_start", "queue", "started_at"),)

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    queue: str = Field(sa_type=String(100))
    started_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class Schedule(StoreModel, table=True):
    """A periodic task's last enqueued tick, shared by every process."""

    __tablename__ = "schedule"

    name: str = Field(sa_column=Column(String(200), primary_key=True))
    last_tick: datetime | None = Field(default=None, sa_column=Column(UTCDateTime))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


@dataclass(frozen=True, slots=True)
class Lease:
    """The proof a runner holds a task: its id and the token its claim received.

    `row` is where the claim found the row on SQLite (its rowid), so that writing the outcome
    goes straight to it instead of through the index of random ids; None: find it by id. It
    only locates the row, so two leases with the same id and token are equal whatever it is.
    """

    task_id: str
    token: int
    row: int | None = field(default=None, compare=False)


@dataclass(slots=True)
class Claim:
    """A task as its claim hands it to a runner: what to run, and the lease to run it under.

    Lighter than a `Task` (a claim builds thousands a second) and holds only what running
    needs; `attempts` is the number of the attempt the claim started.
    """

    id: str
    name: str
    queue: str
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    attempts: int
    max_attempts: int
    lease_token: int
    created_at: datetime
    scheduled_at: datetime
    lease_owner: str
    lease_expires_at: datetime
    started_at: datetime
    trace_context: str | None = None
    status: TaskStatus = TaskStatus.RUNNING
    row: int | None = field(default=None, compare=False)  # the rowid on SQLite (see `Lease`)

    @property
    def lease(self) -> Lease:
        return Lease(self.id, self.lease_token, self.row)


def lease_of(task: Task | Claim) -> Lease:
    """The lease a claimed task was handed."""
    return task.lease if isinstance(task, Claim) else Lease(task.id, task.lease_token)


task_table = Task.__table__  # type: ignore[attr-defined]
schedule_table = Schedule.__table__  # type: ignore[attr-defined]
dependency_table = TaskDependency.__table__  # type: ignore[attr-defined]
attempt_table = Attempt.__table__  # type: ignore[attr-defined]
queue_start_table = QueueStart.__table__  # type: ignore[attr-defined]
metadata = StoreModel.metadata

# The store builds its models with `model_construct` (no validation: the values come from
# the database), which skips the mapper set-up that a first `__init__` would trigger.
configure_mappers()
