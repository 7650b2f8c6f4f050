"""attempts refer to their task by (created_at, id)

An index led by the task's random id put every new attempt on a random page of an index as
large as the history; led by the task's creation time, new attempts fill its last pages.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import store.timeutil

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Named as the module that runs migrations: Alembic loads this file by its path.
log = logging.getLogger("store.migrate")

_COPIED = "id, task_id, number, started_at, finished_at, outcome, error, traceback, worker"


def _attempt_table(name: str, *, by_created: bool) -> None:
    """The attempt table as 0001 made it, or as this revision makes it."""
    key: list[sa.Column[object] | sa.Constraint] = (
        [
            sa.Column("task_created_at", store.timeutil.UTCDateTime(timezone=True), nullable=False),
            sa.ForeignKeyConstraint(
                ["task_created_at", "task_id"],
                ["task.created_at", "task.id"],
                name="fk_attempt_task",
                ondelete="CASCADE",
            ),
        ]
        if by_created
        else [sa.ForeignKeyConstraint(["task_id"], ["task.id"], ondelete="CASCADE")]
    )
    op.create_table(
        name,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", store.timeutil.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=False),
        *key,
        sa.PrimaryKeyConstraint("id"),
    )


def _rebuild_attempts(*, by_created: bool) -> None:
    """SQLite cannot alter a foreign key: a new table gets the rows, then takes the name."""
    _attempt_table("attempt_new", by_created=by_created)
    columns = f"{_COPIED}, task_created_at" if by_created else _COPIED
    picked = ", ".join(f"a.{name}" for name in _COPIED.split(", "))
    picked += ", t.created_at" if by_created else ""
    op.execute(
        f"INSERT INTO attempt_new ({columns}) SELECT {picked}"
        " FROM attempt AS a JOIN task AS t ON t.id = a.task_id"
    )
    # Attempts of tasks that no longer exist (deleted by a connection without
    # `PRAGMA foreign_keys=ON`) have no creation time to take: they are left behind.
    bind = op.get_bind()
    count = "SELECT count(*) FROM {}"
    orphans = bind.exec_driver_sql(count.format("attempt")).scalar_one()
    orphans -= bind.exec_driver_sql(count.format("attempt_new")).scalar_one()
    if orphans:
        log.warning("%d attempts of tasks that no longer exist were dropped", orphans)
    op.drop_table("attempt")
    op.rename_table("attempt_new", "attempt")


def upgrade() -> None:
    op.drop_index("ix_task_created", table_name="task")
    op.create_index("ix_task_created", "task", ["created_at", "id"], unique=True)
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_attempts(by_created=True)
    else:
        op.add_column(
            "attempt",
            sa.Column("task_created_at", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        )
        op.execute(
            "UPDATE attempt SET task_created_at = task.created_at"
            " FROM task WHERE task.id = attempt.task_id"
        )
        op.alter_column("attempt", "task_created_at", nullable=False)
        op.drop_constraint("attempt_task_id_fkey", "attempt", type_="foreignkey")
        op.drop_index("ix_attempt_task", table_name="attempt")
        op.create_foreign_key(
            "fk_attempt_task",
            "attempt",
            "task",
            ["task_created_at", "task_id"],
            ["created_at", "id"],
            ondelete="CASCADE",
        )
    op.create_index("ix_attempt_task", "attempt", ["task_created_at", "task_id", "number"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_attempts(by_created=False)
    else:
        op.drop_index("ix_attempt_task", table_name="attempt")
        op.drop_constraint("fk_attempt_task", "attempt", type_="foreignkey")
        op.drop_column("attempt", "task_created_at")
        op.create_foreign_key(
            "attempt_task_id_fkey", "attempt", "task", ["task_id"], ["id"], ondelete="CASCADE"
        )
    op.create_index("ix_attempt_task", "attempt", ["task_id", "number"])
    op.drop_index("ix_task_created", table_name="task")
    op.create_index("ix_task_created", "task", ["created_at", "id"], unique=False)
