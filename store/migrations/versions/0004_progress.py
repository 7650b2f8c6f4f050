"""a task's progress, as its running attempt reports it

Revision ID: 0004_progress
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_progress"
down_revision: str | None = "0003_trace_context"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("task", sa.Column("progress", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    op.drop_column("task", "progress")  # SQLite drops a column in place since 3.35
