"""Throttles, rate limits and unique jobs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ACTIVE = "unique_key IS NOT NULL AND state IN ('scheduled', 'available', 'running')"


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("jobs", sa.Column("unique_key", sa.Text()), schema=schema)
    op.create_index(
        "jobs_unique_active_idx", "jobs", ["unique_key"], unique=True, schema=schema, postgresql_where=sa.text(ACTIVE)
    )
    op.create_table(
        "throttle_windows",
        sa.Column("task", sa.Text(), primary_key=True),
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("window_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("rejected", sa.Integer(), nullable=False, server_default=sa.text("0")),
        schema=schema,
    )
    op.create_table(
        "unique_locks",
        sa.Column("key", sa.Text(), primary_key=True),
        sa.Column("job_id", postgresql.UUID(as_uuid=False), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        schema=schema,
    )
    op.create_table(
        "rate_events",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=schema,
    )
    op.create_index("rate_events_key_at_idx", "rate_events", ["key", "at"], schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_table("rate_events", schema=schema)
    op.drop_table("unique_locks", schema=schema)
    op.drop_table("throttle_windows", schema=schema)
    op.drop_index("jobs_unique_active_idx", table_name="jobs", schema=schema)
    op.drop_column("jobs", "unique_key", schema=schema)
