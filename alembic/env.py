"""Alembic environment for taskpg.

The database comes from ``config.attributes["dsn"]`` (set by ``taskpg migrate``), else
TASKPG_DSN / DATABASE_URL. The Postgres schema comes from ``config.attributes["schema"]``,
``-x schema=NAME``, TASKPG_SCHEMA, else ``taskpg``; the version table lives in that schema too,
so several taskpg installations can share one database.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import text

from taskpg.connections import sqlalchemy_engine
from taskpg.schema import DEFAULT_SCHEMA, build_metadata, validate_schema_name

config = context.config
dsn = config.attributes.get("dsn") or os.environ.get("TASKPG_DSN") or os.environ.get("DATABASE_URL")
if not dsn:
    raise SystemExit("no database: set TASKPG_DSN (or DATABASE_URL), or use `taskpg migrate --dsn ...`")
schema = validate_schema_name(
    config.attributes.get("schema")
    or context.get_x_argument(as_dictionary=True).get("schema")
    or os.environ.get("TASKPG_SCHEMA")
    or DEFAULT_SCHEMA
)
target_metadata = build_metadata(schema)


def run_migrations_online() -> None:
    engine = sqlalchemy_engine(dsn)
    try:
        with engine.connect() as connection:
            # One migrator at a time: concurrent `taskpg migrate` runs (or auto-migrating
            # embedded apps) queue here instead of racing on CREATE TABLE.
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('taskpg_migrate'))"))
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                version_table_schema=schema,
                include_schemas=False,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("taskpg migrations run online only (they need the schema name and a lock)")
run_migrations_online()
