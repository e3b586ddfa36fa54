"""examples/periodic_report.py simulates a week of beat: five weekday reports, each tick one job, nothing doubled."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from example_runner import run_example

if TYPE_CHECKING:
    import psycopg

UTC = dt.timezone.utc


def test_periodic_report_example(pg_dsn: str, schema: str, db: psycopg.Connection) -> None:
    stdout = run_example("periodic_report.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    lines = stdout.splitlines()
    assert "report jobs run: 5" in lines, stdout
    assert "sync-rates jobs run: 28" in lines, stdout  # every 6 h over the 167 h of a spring-forward week
    assert "jobs fired by the second beat: 0" in lines, stdout
    assert "  reports.weekday_report fired for Mon 2026-03-23 08:00 CET (07:00 UTC)" in lines, stdout
    assert any(line.startswith("one report: jobs by state: ") for line in lines), stdout

    # In Postgres: each report tick (08:00 in Madrid = 07:00 UTC in March, Monday to Friday) has exactly one job.
    rows = db.execute(
        f'SELECT t.tick, count(j.id), min(j.state) FROM "{schema}".periodic_ticks t '
        f'JOIN "{schema}".jobs j ON j.id = t.job_id WHERE t.schedule = %s GROUP BY t.tick ORDER BY t.tick',
        ("reports.weekday_report",),
    ).fetchall()
    assert rows == [(dt.datetime(2026, 3, day, 7, 0, tzinfo=UTC), 1, "succeeded") for day in range(23, 28)]
    jobs = db.execute(f'SELECT count(*) FROM "{schema}".jobs WHERE task = %s', ("reports.weekday_report",)).fetchone()
    assert jobs == (5,)  # no job outside the ticks either
