"""Envelopes the buffer's Redis lost: counted where they cannot be lost too.

A flusher that sees buffer lists shrink by more than it moved (eviction, a restart without persistence)
writes one row here per list and event, with the least number of envelopes lost and the likely cause;
`taskpg status` reports them. Rows are kept (they are few); delete them once the loss is dealt with.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "buffer_losses",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("list_name", sa.Text(), nullable=False),
        sa.Column("lost", sa.BigInteger(), nullable=False),
        sa.Column("cause", sa.Text(), nullable=False),
        schema=schema,
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_table("buffer_losses", schema=schema)
