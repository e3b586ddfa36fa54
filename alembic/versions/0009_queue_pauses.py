"""Paused queues, and a finished-jobs index that counts per queue without reading the table.

queue_pauses: one row per paused queue. The claim skips a queue that has a row here, so a pause holds for
every worker from its commit on (no worker caches it); resume deletes the row and wakes the workers.

jobs_finished_idx gets the queue as an included column: the counts per queue of succeeded, dead and
cancelled jobs (the status API, the dashboard) and the throughput of the last minutes become index-only
scans, however many finished rows are kept. It replaces the old index (same key), so a finish writes no
more index entries than before. Rebuilding it locks the jobs table for writes while it runs: on a big
table, migrate when the queue is quiet.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

FINISHED = sa.text("state IN ('succeeded', 'dead', 'cancelled')")


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "queue_pauses",
        sa.Column("queue", sa.Text(), primary_key=True),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        schema=schema,
    )
    op.drop_index("jobs_finished_idx", table_name="jobs", schema=schema)
    op.create_index(
        "jobs_finished_idx",
        "jobs",
        ["state", "finished_at"],
        schema=schema,
        postgresql_where=FINISHED,
        postgresql_include=["queue"],
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_index("jobs_finished_idx", table_name="jobs", schema=schema)
    op.create_index("jobs_finished_idx", "jobs", ["state", "finished_at"], schema=schema, postgresql_where=FINISHED)
    op.drop_table("queue_pauses", schema=schema)
