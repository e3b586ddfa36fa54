"""Buffered calls that a unique key turned away: the handle leads to the job holding the key.

A buffered call of a unique task is pushed before Postgres is asked; when the flusher finds the key
held by an unfinished job (a direct enqueue, another producer's envelope), the call's job is not
written. duplicates records its id and the holder's, so the call's handle reports the holder (as a
direct enqueue's handle does) instead of staying PENDING. Rows are pruned after seven days.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "duplicates",
        sa.Column("id", UUID(as_uuid=False), primary_key=True),
        sa.Column("holder", UUID(as_uuid=False), nullable=False),
        sa.Column("unique_key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        schema=schema,
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_table("duplicates", schema=schema)
