"""the starts of rate-limited queues, counted by every runner

Revision ID: 0006_rate_limits
Revises: 0005_dependencies
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import store.timeutil

revision: str = "0006_rate_limits"
down_revision: str | None = "0005_dependencies"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "queue_start",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("started_at", store.timeutil.UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_queue_start", "queue_start", ["queue", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_queue_start", table_name="queue_start")
    op.drop_table("queue_start")
