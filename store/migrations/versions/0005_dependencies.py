"""follow-up tasks and `after=`: the links between tasks, and what a waiting task counts

A task enqueued `after=` other tasks waits, queued, until each of them succeeded: its
`waiting_on` counts those that have not, and the claim's partial indexes leave it out until
that is 0 (so they are built again with the new WHERE clause). `task_dependency` holds the
links by parent; `has_dependants` marks a parent that has any, so that an outcome looks for
them only then. `parent_id` names the task whose success enqueued a follow-up.

Revision ID: 0005_dependencies
Revises: 0004_progress
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_dependencies"
down_revision: str | None = "0004_progress"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIMABLE_BEFORE = "status IN ('queued', 'retrying')"
CLAIMABLE_NOW = "status IN ('queued', 'retrying') AND waiting_on = 0"
WAITING = "status = 'queued' AND waiting_on > 0"


def _claimable_indexes(where: str) -> None:
    """(Re)create the claim's two partial indexes with `where` (they were dropped first)."""
    op.create_index(
        "ix_task_claimable",
        "task",
        [sa.text("priority DESC"), "scheduled_at"],
        sqlite_where=sa.text(where),
        postgresql_where=sa.text(where),
    )
    op.create_index(
        "ix_task_claimable_queue",
        "task",
        ["queue", sa.text("priority DESC"), "scheduled_at"],
        sqlite_where=sa.text(where),
        postgresql_where=sa.text(where),
    )


def upgrade() -> None:
    # Columns with constant defaults: neither engine rewrites the table to add them.
    op.add_column("task", sa.Column("parent_id", sa.String(length=36), nullable=True))
    op.add_column("task", sa.Column("after", sa.JSON(none_as_null=True), nullable=True))
    op.add_column(
        "task", sa.Column("waiting_on", sa.Integer(), nullable=False, server_default=sa.text("0"))
    )
    op.add_column(
        "task",
        sa.Column("has_dependants", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.drop_index("ix_task_claimable", table_name="task")
    op.drop_index("ix_task_claimable_queue", table_name="task")
    _claimable_indexes(CLAIMABLE_NOW)
    op.create_index(
        "ix_task_waiting",
        "task",
        ["queue"],
        sqlite_where=sa.text(WAITING),
        postgresql_where=sa.text(WAITING),
    )
    op.create_table(
        "task_dependency",
        sa.Column("child_id", sa.String(length=36), nullable=False),
        sa.Column("parent_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["child_id"], ["task.id"], name="fk_task_dependency_child", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["task.id"], name="fk_task_dependency_parent", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("child_id", "parent_id", name="pk_task_dependency"),
    )
    op.create_index("ix_task_dependency_parent", "task_dependency", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_task_dependency_parent", table_name="task_dependency")
    op.drop_table("task_dependency")
    op.drop_index("ix_task_waiting", table_name="task")
    op.drop_index("ix_task_claimable", table_name="task")
    op.drop_index("ix_task_claimable_queue", table_name="task")
    _claimable_indexes(CLAIMABLE_BEFORE)
    # SQLite drops a column in place since 3.35 (none of these is indexed any more).
    for column in ("has_dependants", "waiting_on", "after", "parent_id"):
        op.drop_column("task", column)
