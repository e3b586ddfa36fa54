"""Run the packaged Alembic migrations programmatically (what ``taskpg migrate`` calls)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from .connections import sqlalchemy_engine
from .schema import DEFAULT_SCHEMA, validate_schema_name


def scripts_location() -> Path:
    """Where the migration scripts are: ``alembic/`` of a checkout, shipped as ``taskpg._alembic``."""
    package = Path(__file__).resolve().parent
    # An installed wheel carries them as taskpg/_alembic; a checkout has them at ../alembic.
    for location in (package / "_alembic", package.parent / "alembic"):
        if (location / "env.py").is_file():
            return location
    raise FileNotFoundError("taskpg's Alembic scripts are missing from this installation")


def alembic_config(dsn: str, schema: str = DEFAULT_SCHEMA) -> Config:
    """An Alembic Config pointing at the packaged scripts, for this database and schema."""
    config = Config()
    config.set_main_option("script_location", str(scripts_location()))
    config.attributes["dsn"] = dsn
    config.attributes["schema"] = validate_schema_name(schema)
    return config


def upgrade(dsn: str, schema: str = DEFAULT_SCHEMA, revision: str = "head") -> None:
    """Migrate the schema up to ``revision`` (default: the newest)."""
    command.upgrade(alembic_config(dsn, schema), revision)


def downgrade(dsn: str, schema: str = DEFAULT_SCHEMA, revision: str = "-1") -> None:
    """Migrate the schema down to ``revision`` (default: one step; ``base`` removes every table)."""
    command.downgrade(alembic_config(dsn, schema), revision)


def current(dsn: str, schema: str = DEFAULT_SCHEMA) -> str | None:
    """The revision the schema is at, or None when it was never migrated."""
    engine = sqlalchemy_engine(dsn)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"version_table_schema": validate_schema_name(schema)}
            )
            return context.get_current_revision()
    finally:
        engine.dispose()
