"""Honest attempts after a crash: which jobs a worker had started, and how often a job was rescued.

workers.running lists the jobs a worker has started and not yet written an outcome for (written a few
ms after they start, and before a job that was rescued before starts). Rescue charges the attempt only
to those; a job that was only claimed gets it back. jobs.rescues counts rescues, jobs.crashes the
rescues of a started job: a job whose worker died while running it three times goes dead.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, UUID

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("jobs", sa.Column("rescues", sa.Integer(), nullable=False, server_default="0"), schema=schema)
    op.add_column("jobs", sa.Column("crashes", sa.Integer(), nullable=False, server_default="0"), schema=schema)
    op.add_column("workers", sa.Column("running", ARRAY(UUID(as_uuid=False))), schema=schema)


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_column("workers", "running", schema=schema)
    op.drop_column("jobs", "crashes", schema=schema)
    op.drop_column("jobs", "rescues", schema=schema)
