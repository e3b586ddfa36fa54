"""Job headers and progress: small JSON that travels with a job, and what a running job says of itself.

headers: set at enqueue by ``before_task_publish`` receivers (keys they add to ``headers``, a W3C traceparent
say), stored in the job's row in the enqueue's own transaction, and given to the attempt as
``request.headers``. progress: ``{"state": ..., "meta": ...}`` written by ``self.update_state()`` while the job
runs; its handle reports that state. Both NULL for most jobs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("jobs", sa.Column("headers", JSONB()), schema=schema)
    op.add_column("jobs", sa.Column("progress", JSONB()), schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_column("jobs", "progress", schema=schema)
    op.drop_column("jobs", "headers", schema=schema)
