"""docs/configuration.md: Alembic owns the schema, unmigrated use fails clearly, schemas, schema names."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from support.paths import REPO
from support.rows import tables

from taskpg import ConfigurationError, SchemaNotReady, TaskPG, migrate
from taskpg.connections import sqlalchemy_engine
from taskpg.schema import SCHEMA_REVISION, build_metadata

if TYPE_CHECKING:
    import psycopg


def test_schema_revision_is_the_alembic_head() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused", "taskpg"))
    assert script.get_current_head() == SCHEMA_REVISION


def test_migrated_database_matches_schema_py(pg_dsn: str, migrated_schema: str) -> None:
    engine = sqlalchemy_engine(pg_dsn)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "version_table_schema": migrated_schema,
                    "include_name": lambda name, kind, parent: kind != "schema" or name == migrated_schema,
                },
            )
            diff = compare_metadata(context, build_metadata(migrated_schema))
    finally:
        engine.dispose()
    assert diff == []


def test_downgrade_upgrade_round_trip(pg_dsn: str, schema: str, db: psycopg.Connection) -> None:
    migrate.upgrade(pg_dsn, schema)
    assert migrate.current(pg_dsn, schema) == SCHEMA_REVISION
    assert {"jobs", "workers", "alembic_version"} <= tables(db, schema)
    migrate.downgrade(pg_dsn, schema, "base")
    assert migrate.current(pg_dsn, schema) is None
    assert tables(db, schema) == {"alembic_version"}
    migrate.upgrade(pg_dsn, schema)
    assert migrate.current(pg_dsn, schema) == SCHEMA_REVISION


def test_enqueue_on_unmigrated_schema_names_taskpg_migrate(pg_dsn: str, schema: str) -> None:
    app = TaskPG(pg_dsn, schema=schema)

    @app.task
    def noop() -> None:
        return None

    with pytest.raises(SchemaNotReady, match=f"{schema}.*is not migrated.*taskpg migrate"):
        noop.delay()
    app.close()


def test_enqueue_on_outdated_schema_names_taskpg_migrate(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection
) -> None:
    db.execute(f'UPDATE "{migrated_schema}".alembic_version SET version_num = %s', ("0000",))
    app = TaskPG(pg_dsn, schema=migrated_schema)

    @app.task
    def noop() -> None:
        return None

    with pytest.raises(SchemaNotReady, match=r"is at revision 0000.*taskpg migrate"):
        noop.delay()
    app.close()


def test_plain_alembic_with_the_shipped_config(pg_dsn: str, schema: str, db: psycopg.Connection) -> None:
    env = {**os.environ, "TASKPG_DSN": pg_dsn}
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"schema={schema}"]
    subprocess.run([*alembic, "upgrade", "head"], check=True, env=env, cwd=REPO.parent, capture_output=True)
    assert "jobs" in tables(db, schema)
    out = subprocess.run([*alembic, "current"], check=True, env=env, cwd=REPO.parent, capture_output=True, text=True)
    assert SCHEMA_REVISION in out.stdout
    subprocess.run([*alembic, "downgrade", "base"], check=True, env=env, cwd=REPO.parent, capture_output=True)
    assert "jobs" not in tables(db, schema)


def test_two_schemas_are_independent(pg_dsn: str, migrated_schema: str, db: psycopg.Connection) -> None:
    other = migrated_schema + "_b"
    migrate.upgrade(pg_dsn, other)
    try:
        first, second = TaskPG(pg_dsn, schema=migrated_schema), TaskPG(pg_dsn, schema=other)
        for app in (first, second):
            app.task(name="same.name")(lambda: None)
        first.tasks["same.name"].delay()
        row = db.execute(f'SELECT count(*) FROM "{other}".jobs').fetchone()
        assert row == (0,)
        first.close()
        second.close()
    finally:
        db.execute(f'DROP SCHEMA "{other}" CASCADE')


def test_bad_schema_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="schema name"):
        TaskPG("postgresql://x@127.0.0.1/x", schema='x"; DROP TABLE jobs; --')


@pytest.mark.parametrize("limit", [0, -1, 268_435_456, 2**31, True])
def test_max_payload_bytes_stays_within_what_postgres_can_store(limit: int) -> None:
    """Above jsonb's 268,435,455 bytes Postgres refuses the value, and a statement over 1 GB closes the
    connection (which would read as an outage): such a limit is refused when the app is made."""
    with pytest.raises(ConfigurationError, match="max_payload_bytes"):
        TaskPG("postgresql://unused", max_payload_bytes=limit)


def test_max_payload_bytes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKPG_MAX_PAYLOAD_BYTES", "5000")
    assert TaskPG("postgresql://unused").max_payload_bytes == 5000
    assert TaskPG("postgresql://unused", max_payload_bytes=10).max_payload_bytes == 10  # the argument wins
    monkeypatch.setenv("TASKPG_MAX_PAYLOAD_BYTES", "lots")
    with pytest.raises(ConfigurationError, match="TASKPG_MAX_PAYLOAD_BYTES"):
        TaskPG("postgresql://unused")
