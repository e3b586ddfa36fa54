"""examples/transactional.py runs against the test database and shows commit -> 1 job, rollback -> 0 jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from example_runner import run_example

if TYPE_CHECKING:
    import psycopg


def test_transactional_example(pg_dsn: str, schema: str, db: psycopg.Connection) -> None:
    stdout = run_example("transactional.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    lines = stdout.splitlines()
    assert "committed: 1 order(s), 1 job(s)" in lines, stdout
    assert "rolled back: 0 order(s), 0 job(s)" in lines, stdout

    # What the database holds afterwards: the one committed job, waiting; no orders table.
    rows = db.execute(f'SELECT task, queue, state, args FROM "{schema}".jobs').fetchall()
    assert rows == [("shop.ship_order", "shipping", "available", [1])]
    tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall()
    assert ("orders",) not in tables
