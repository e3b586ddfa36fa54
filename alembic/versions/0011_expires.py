"""Expiry: a job not started by its expires_at is never run (Celery's ``expires=``).

The claim cancels an available job whose expires_at has passed instead of running it, with a JobExpired
error, and tells get() waiters; NULL (most jobs) never expires.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("jobs", sa.Column("expires_at", sa.DateTime(timezone=True)), schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_column("jobs", "expires_at", schema=schema)
