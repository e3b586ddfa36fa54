"""Postgres helpers: a fresh schema per run, server facts, seeding rows, waiting for a drain.

Seeding is set-up, not measurement: it uses plain COPY, so every workload starts from the same
rows whatever taskpg's enqueue path costs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from taskpg import migrate

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Settings worth reporting next to the numbers (when they differ from the built-in default).
RELEVANT_SETTINGS = (
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "commit_delay",
    "work_mem",
    "autovacuum",
    "max_connections",
    "jit",
)
#: Always reported: the durability settings the numbers depend on most.
DURABILITY_SETTINGS = ("fsync", "synchronous_commit")


class BenchmarkError(RuntimeError):
    """A run did not end in the state it had to (jobs missing, lost, duplicated...)."""


def render(template: str, schema: str) -> str:
    """A statement with ``{jobs}`` / ``{workers}`` replaced by the schema's quoted tables."""
    return (
        sql.SQL(template)
        .format(jobs=sql.Identifier(schema, "jobs"), workers=sql.Identifier(schema, "workers"))
        .as_string()
    )


def connect(dsn: str, autocommit: bool = True) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=autocommit)


@contextlib.contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A new schema migrated with taskpg's migrations, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    migrate.upgrade(dsn, name)
    try:
        yield name
    finally:
        with connect(dsn) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def server_info(dsn: str) -> dict[str, Any]:
    """Postgres version and the relevant settings that are not at their default (durability always)."""
    with connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        rows = conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings "
            "WHERE name = ANY(%(names)s) AND (source <> 'default' OR name = ANY(%(always)s)) ORDER BY name",
            {"names": list(RELEVANT_SETTINGS), "always": list(DURABILITY_SETTINGS)},
        ).fetchall()
    settings = {name: value for name, value in rows}
    durable = settings.get("fsync") == "on" and settings.get("synchronous_commit") in ("on", "remote_apply", "local")
    return {"pg_version": version[0] if version else "?", "pg_settings": settings, "durable": durable}


def job_rows(
    n: int, task: str, state: str = "available", run_at: dt.datetime | None = None, start: int = 0
) -> Iterator[tuple[Any, ...]]:
    """Rows for COPY (id, task, queue, args, kwargs, state, run_at, finished_at): the i-th has args [i]."""
    now = dt.datetime.now(dt.timezone.utc)
    when = run_at or now
    finished = now - dt.timedelta(hours=1) if state in ("succeeded", "dead", "cancelled") else None
    for i in range(start, start + n):
        yield (str(uuid.uuid4()), task, "default", f"[{i}]", "{}", state, when, finished)


def copy_rows(conn: psycopg.Connection[Any], schema: str, rows: Iterator[tuple[Any, ...]]) -> None:
    """COPY rows made by :func:`job_rows` into the schema's jobs table (in the caller's transaction)."""
    statement = render("COPY {jobs} (id, task, queue, args, kwargs, state, run_at, finished_at) FROM STDIN", schema)
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def seed_ready(dsn: str, schema: str, n: int, task: str, channel: str) -> float:
    """COPY ``n`` available jobs and NOTIFY ``channel`` in one transaction; returns the
    ``perf_counter()`` taken just before the commit that makes them visible."""
    with connect(dsn, autocommit=False) as conn:
        copy_rows(conn, schema, job_rows(n, task))
        conn.execute("SELECT pg_notify(%s, 'default')", [channel])
        started = time.perf_counter()
        conn.commit()
    return started


def seed_backlog(dsn: str, schema: str, scheduled: int, finished: int, task: str) -> None:
    """Rows a worker must step over: jobs scheduled a day ahead, and jobs that succeeded an hour ago."""
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    with connect(dsn, autocommit=False) as conn:
        copy_rows(conn, schema, job_rows(scheduled, task, "scheduled", run_at=later, start=10_000_000))
        copy_rows(conn, schema, job_rows(finished, task, "succeeded", start=20_000_000))
        conn.commit()


def wait_drained(dsn: str, schema: str, timeout: float, poll: float = 0.01) -> float:
    """Poll until no job is available or running; returns the ``perf_counter()`` when seen.

    Both tests walk a small partial index (claim / running), so polling costs the workers little.
    """
    busy = render(
        "SELECT EXISTS (SELECT 1 FROM {jobs} WHERE state = 'available') "
        "OR EXISTS (SELECT 1 FROM {jobs} WHERE state = 'running')",
        schema,
    )
    deadline = time.perf_counter() + timeout
    with connect(dsn) as conn:
        while True:
            row = conn.execute(busy).fetchone()
            now = time.perf_counter()
            if row is not None and not row[0]:
                return now
            if now > deadline:
                raise BenchmarkError(
                    f"jobs still waiting or running after {timeout:.0f} s: {state_counts(dsn, schema)}"
                )
            time.sleep(poll)


def state_counts(dsn: str, schema: str) -> dict[str, int]:
    with connect(dsn) as conn:
        rows = conn.execute(render("SELECT state, count(*) FROM {jobs} GROUP BY state", schema)).fetchall()
    return {state: int(count) for state, count in rows}


def expect_count(dsn: str, schema: str, state: str, expected: int) -> None:
    """Fail unless exactly ``expected`` committed rows are in ``state`` (the only count that matters)."""
    found = state_counts(dsn, schema).get(state, 0)
    if found != expected:
        raise BenchmarkError(f"expected {expected} {state} jobs, the database has {state_counts(dsn, schema)}")


def latencies_ms(dsn: str, schema: str) -> list[float]:
    """Enqueue -> claim latency of every started job: ``started_at - created_at`` (database clock)."""
    with connect(dsn) as conn:
        rows = conn.execute(
            render(
                "SELECT extract(epoch FROM started_at - created_at) * 1000 FROM {jobs} WHERE started_at IS NOT NULL",
                schema,
            )
        ).fetchall()
    return [float(row[0]) for row in rows]
