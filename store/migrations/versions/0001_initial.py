"""tasks, attempts and schedules

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import store.timeutil

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("kwargs", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", store.timeutil.UTCDateTime(timezone=True), nullable=False),
        sa.Column("scheduled_at", store.timeutil.UTCDateTime(timezone=True), nullable=False),
        sa.Column("started_at", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.Column("lease_token", sa.Integer(), nullable=False),
        sa.Column("expirations", sa.Integer(), nullable=False),
        sa.Column("cancel_requested_at", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "status <> 'running' OR (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)",
            name="ck_task_running_leased",
        ),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'cancelled')",
            name="ck_task_status",
        ),
        sa.CheckConstraint(
            "status NOT IN ('succeeded', 'failed', 'cancelled') OR finished_at IS NOT NULL",
            name="ck_task_terminal_finished",
        ),
        sa.CheckConstraint("attempts >= 0 AND attempts <= max_attempts", name="ck_task_attempts"),
        sa.CheckConstraint("max_attempts >= 1", name="ck_task_max_attempts"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key", name="uq_task_idempotency_key"),
    )
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.create_index(
            "ix_task_claimable",
            [sa.text("priority DESC"), "scheduled_at"],
            unique=False,
            sqlite_where=sa.text("status IN ('queued', 'retrying')"),
            postgresql_where=sa.text("status IN ('queued', 'retrying')"),
        )
        batch_op.create_index(
            "ix_task_claimable_queue",
            ["queue", sa.text("priority DESC"), "scheduled_at"],
            unique=False,
            sqlite_where=sa.text("status IN ('queued', 'retrying')"),
            postgresql_where=sa.text("status IN ('queued', 'retrying')"),
        )
        batch_op.create_index(
            "ix_task_prune",
            ["status", "finished_at"],
            unique=False,
            sqlite_where=sa.text("status IN ('succeeded', 'failed', 'cancelled')"),
            postgresql_where=sa.text("status IN ('succeeded', 'failed', 'cancelled')"),
        )
        batch_op.create_index("ix_task_created", ["created_at", "id"], unique=False)
        batch_op.create_index(
            "ix_task_lease_expiry",
            ["lease_expires_at"],
            unique=False,
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        )
        batch_op.create_index("ix_task_name_created", ["name", "created_at"], unique=False)
        batch_op.create_index("ix_task_queue_created", ["queue", "created_at"], unique=False)
        batch_op.create_index(
            "ix_task_finished_status",
            ["status", "created_at", "id"],
            unique=False,
            sqlite_where=sa.text("status IN ('succeeded', 'failed', 'cancelled')"),
            postgresql_where=sa.text("status IN ('succeeded', 'failed', 'cancelled')"),
        )

    op.create_table(
        "attempt",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("started_at", store.timeutil.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["task.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("attempt", schema=None) as batch_op:
        batch_op.create_index("ix_attempt_task", ["task_id", "number"], unique=False)

    op.create_table(
        "schedule",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("last_tick", store.timeutil.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", store.timeutil.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("schedule")
    with op.batch_alter_table("attempt", schema=None) as batch_op:
        batch_op.drop_index("ix_attempt_task")

    op.drop_table("attempt")
    with op.batch_alter_table("task", schema=None) as batch_op:
        batch_op.drop_index("ix_task_finished_status")
        batch_op.drop_index("ix_task_queue_created")
        batch_op.drop_index("ix_task_name_created")
        batch_op.drop_index(
            "ix_task_lease_expiry",
            sqlite_where=sa.text("status = 'running'"),
            postgresql_where=sa.text("status = 'running'"),
        )
        batch_op.drop_index("ix_task_created")
        batch_op.drop_index("ix_task_claimable")
        batch_op.drop_index("ix_task_claimable_queue")
        batch_op.drop_index("ix_task_prune")

    op.drop_table("task")
