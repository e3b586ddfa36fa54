"""Reading jobs and tables straight from the database, to check what the code under test wrote."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row

if TYPE_CHECKING:
    import psycopg

    from taskpg import TaskPG


def _schema(where: TaskPG | str) -> str:
    return where if isinstance(where, str) else where.schema


def job_row(db: psycopg.Connection, where: TaskPG | str, job_id: str) -> dict[str, Any]:
    """The job's row as a dict of columns; ``where`` is the app or its schema name."""
    with db.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f'SELECT * FROM "{_schema(where)}".jobs WHERE id = %s', (job_id,)).fetchone()
    assert row is not None, f"job {job_id} not found"
    return row


def jobs_by_id(db: psycopg.Connection, schema: str) -> dict[str, dict[str, Any]]:
    """Every job's row, by job id."""
    with db.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(f'SELECT * FROM "{schema}".jobs').fetchall()
    return {str(r["id"]): r for r in rows}


def state_counts(db: psycopg.Connection, schema: str) -> dict[str, int]:
    return dict(db.execute(f'SELECT state, count(*) FROM "{schema}".jobs GROUP BY state').fetchall())


def tables(db: psycopg.Connection, schema: str) -> set[str]:
    rows = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall()
    return {r[0] for r in rows}
