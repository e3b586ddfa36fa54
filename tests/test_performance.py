"""docs/performance.md: the benchmark suite runs at tiny sizes, and the hot statements keep their index plans."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

from support.paths import REPO

if TYPE_CHECKING:
    from pathlib import Path

    import psycopg

    from taskpg import TaskPG

WORKLOADS = {"W1", "W1b", "W2", "W3", "W3b", "W4", "W5", "W6", "W7", "W9"}
FIELDS = {"workload", "variant", "concurrency", "batch", "jobs", "seconds", "jobs_per_s", "p50_ms", "p99_ms", "ratio"}


# -- the benchmark suite runs end to end at tiny sizes, so it cannot rot (no assertions on speed) ---------


def test_benchmark_smoke_run(pg_dsn: str, redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--dsn", pg_dsn, "--redis-url", redis_url]
    proc = subprocess.run(
        [*command, "--json-out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    results = [r for r in records if r["kind"] == "result"]
    assert {r["workload"] for r in results} == WORKLOADS
    for result in results:
        assert result.keys() >= FIELDS, result
        assert result["jobs"] > 0 and result["seconds"] > 0 and "error" not in result, result
        assert result["pg_version"] and result["pg_settings"]["fsync"] in ("on", "off")
    latency = [r for r in results if r["workload"] in ("W2", "W4")]
    assert all(r["p50_ms"] is not None and r["p99_ms"] is not None for r in latency)
    assert any(r["ratio"] is not None for r in results)  # taskpg is reported against its raw baseline

    buffer = next(r for r in results if r["workload"] == "W1b" and r["variant"].startswith("buffer"))
    assert buffer["extra"]["lost"] == 0 and buffer["extra"]["duplicated"] == 0
    plans = next(r for r in results if r["workload"] == "W5" and r["ratio_of"])
    assert set(plans["extra"]) >= {"claim_no_stats_drained", "claim", "finish", "claim_generic"}
    bloat = [r for r in results if r["workload"] == "W6"]
    assert all(r["extra"]["bloat"] > 0 and r["extra"]["autovacuum"] in ("on", "off") for r in bloat)
    long_tx = next(r for r in bloat if r["variant"].endswith("long transaction"))
    assert {"before_jobs_per_s", "during_jobs_per_s", "after_jobs_per_s", "recovered"} <= set(long_tx["extra"])
    notify = {r["variant"]: r["extra"]["notifications"] for r in results if r["workload"] == "W7"}
    assert notify["raw INSERT, no NOTIFY, autocommit"] == 0 and notify["raw INSERT + pg_notify, autocommit"] > 0
    limited = [r["extra"] for r in results if r["workload"] == "W9"]
    assert len(limited) == 3 and all(e["most_in_a_period"] <= e["limit_per_period"] for e in limited)
    assert all(e["delivered_per_s"] > 0 and e["updates_per_job"] >= 2 for e in limited)
    assert any(r["kind"] == "target" for r in records)
    assert "| workload |" in proc.stdout  # the table


# -- the hot statements keep using their indexes on a large table (EXPLAIN, not timing) -----------------


def plan(db: psycopg.Connection, statement: str, params: dict[str, object]) -> str:
    # EXPLAIN without ANALYZE: nothing runs, so claims and updates change no row.
    rows = db.execute("EXPLAIN (FORMAT JSON) " + statement, params).fetchone()
    assert rows is not None
    return json.dumps(rows[0])


def fill(db: psycopg.Connection, app: TaskPG, rows: int = 30_000) -> None:
    db.execute(
        f'INSERT INTO "{app.schema}".jobs (id, task, queue, state, run_at, finished_at) '
        "SELECT gen_random_uuid(), 't', 'default', s.state, now() + interval '1 hour', "
        "CASE WHEN s.state = 'succeeded' THEN now() END "
        "FROM generate_series(1, %s) AS n, (VALUES ('available'), ('scheduled'), ('succeeded')) AS s(state)",
        (rows,),
    )
    db.execute(f'ANALYZE "{app.schema}".jobs')


def test_claim_uses_the_partial_claim_index(app: TaskPG, db: psycopg.Connection) -> None:
    fill(db, app)
    text = plan(
        db,
        app.store.q.claim_jobs,
        {
            "queues": ["default"],
            "limit": 100,
            "worker_id": "w",
            "fetch_limit": 2_000_000,
            "done_channel": "x",
            "jobs_channel": "y",
        },
    )
    assert "jobs_claim_idx" in text
    assert '"Node Type": "Seq Scan"' not in text


def test_stager_and_finish_use_their_indexes(app: TaskPG, db: psycopg.Connection) -> None:
    fill(db, app)
    q = app.store.q
    staged = plan(db, q.promote_due, {"limit": 1000, "channel": q.jobs_channel})
    assert "jobs_scheduled_idx" in staged and '"Node Type": "Seq Scan"' not in staged
    ids = [r[0] for r in db.execute(f'SELECT id::text FROM "{app.schema}".jobs LIMIT 200').fetchall()]
    finish = plan(
        db,
        q.finish_jobs,
        {"outcomes": json.dumps([{"id": i, "lease": i, "state": "succeeded"} for i in ids])},
    )
    # One primary-key lookup per outcome, never a walk over every running job or the table.
    assert "jobs_pkey" in finish and "jobs_running_idx" not in finish and '"Node Type": "Seq Scan"' not in finish


def test_queue_depths_read_only_the_rows_of_each_state(app: TaskPG, db: psycopg.Connection) -> None:
    """Metrics scrape it every few seconds: on a table of mostly finished jobs, never a whole-table scan."""
    db.execute(
        f'INSERT INTO "{app.schema}".jobs (id, task, queue, state, run_at, finished_at) '
        "SELECT gen_random_uuid(), 't', 'q' || (n % 5), s.state, now(), "
        "CASE WHEN s.state IN ('succeeded', 'dead') THEN now() END "
        "FROM generate_series(1, 60000) AS n, (VALUES ('succeeded')) AS s(state) "
        "UNION ALL SELECT gen_random_uuid(), 't', 'q1', s.state, now(), "
        "CASE WHEN s.state = 'dead' THEN now() END "
        "FROM generate_series(1, 200), (VALUES ('available'), ('scheduled'), ('running'), ('dead')) AS s(state)"
    )
    db.execute(f'ANALYZE "{app.schema}".jobs')
    text = plan(db, app.store.q.queue_depths, {})
    assert '"Node Type": "Seq Scan"' not in text, text
    for index in ("jobs_claim_idx", "jobs_scheduled_idx", "jobs_running_idx", "jobs_finished_idx"):
        assert index in text, (index, text)
    depths = {(d.queue, d.state): d.count for d in app.store.queue_depths()}
    assert depths == {("q1", s): 200 for s in ("available", "scheduled", "running", "dead")}
