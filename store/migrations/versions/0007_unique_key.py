"""a task may hold a unique key while it is active

At most one queued, running or retrying task per key, enforced by a partial unique index so
that enqueues racing in several processes store one task; a task that ended frees its key.

Revision ID: 0007_unique_key
Revises: 0006_rate_limits
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_unique_key"
down_revision: str | None = "0006_rate_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The models' `UNIQUE_ACTIVE_WHERE`, as it was at this revision: a migration never follows
# later changes of the models.
ACTIVE_WHERE = "status IN ('queued', 'running', 'retrying') AND unique_key IS NOT NULL"


def upgrade() -> None:
    # Nullable with no default: both engines add it without rewriting the table, and the
    # index, which leaves out rows without a key, starts empty.
    op.add_column("task", sa.Column("unique_key", sa.String(length=200), nullable=True))
    op.create_index(
        "uq_task_unique_key_active",
        "task",
        ["unique_key"],
        unique=True,
        sqlite_where=sa.text(ACTIVE_WHERE),
        postgresql_where=sa.text(ACTIVE_WHERE),
    )


def downgrade() -> None:
    op.drop_index("uq_task_unique_key_active", table_name="task")
    op.drop_column("task", "unique_key")  # SQLite drops a column in place since 3.35
