"""a task keeps the trace context of the span that enqueued it

Its attempts' spans then join the enqueueing request's trace, whichever process runs them
and however long after.

Revision ID: 0003_trace_context
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_trace_context"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable with no default: SQLite and PostgreSQL add it without rewriting the table.
    op.add_column("task", sa.Column("trace_context", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("task", "trace_context")
