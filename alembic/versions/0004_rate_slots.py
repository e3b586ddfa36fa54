"""Rate limits by GCRA with reserved slots: one row per limiter key, a reserved start on the job.

The sliding-window log of rate_events (a row per start, counted under a lock at every decision) is
replaced by rate_limits: one row per key holding its theoretical arrival time, updated in one upsert.
A job the limiter held back carries the start it reserved in jobs.rate_slot, so it is not asked again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("jobs", sa.Column("rate_slot", sa.DateTime(timezone=True)), schema=schema)
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("tat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("granted", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        schema=schema,
    )
    op.drop_index("rate_events_key_at_idx", table_name="rate_events", schema=schema)
    op.drop_table("rate_events", schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "rate_events",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema,
    )
    op.create_index("rate_events_key_at_idx", "rate_events", ["key", "at"], schema=schema)
    op.drop_table("rate_limits", schema=schema)
    op.drop_column("jobs", "rate_slot", schema=schema)
