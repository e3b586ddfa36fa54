"""Initial schema: jobs and workers.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = "'scheduled', 'available', 'running', 'succeeded', 'dead', 'cancelled'"


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "jobs",
        sa.Column("id", postgresql.UUID(as_uuid=False), primary_key=True),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("args", postgresql.JSONB(), nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("kwargs", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("max_attempts", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("snoozes", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("lease", postgresql.UUID(as_uuid=False)),
        sa.Column("worker_id", sa.Text()),
        sa.Column("result", postgresql.JSONB()),
        sa.Column("errors", postgresql.JSONB(), nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.CheckConstraint(f"state IN ({STATES})", name="jobs_state_check"),
        schema=schema,
    )
    op.create_index(
        "jobs_claim_idx",
        "jobs",
        ["queue", sa.text("priority DESC"), "run_at", "id"],
        schema=schema,
        postgresql_where=sa.text("state = 'available'"),
    )
    op.create_index(
        "jobs_scheduled_idx", "jobs", ["run_at"], schema=schema, postgresql_where=sa.text("state = 'scheduled'")
    )
    op.create_index(
        "jobs_running_idx", "jobs", ["worker_id"], schema=schema, postgresql_where=sa.text("state = 'running'")
    )
    op.create_index(
        "jobs_finished_idx",
        "jobs",
        ["state", "finished_at"],
        schema=schema,
        postgresql_where=sa.text("state IN ('succeeded', 'dead', 'cancelled')"),
    )
    # The jobs table is small and hot: rows are updated a few times each and then pruned.
    # Leave room for HOT updates and vacuum it early rather than late.
    op.execute(
        sa.text(
            f'ALTER TABLE "{schema}".jobs SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, '
            "autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0)"
        )
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        schema=schema,
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_table("workers", schema=schema)
    op.drop_table("jobs", schema=schema)
