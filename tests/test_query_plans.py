"""The hot statements keep using their indexes on a large table (EXPLAIN, not timing)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

    from taskpg import TaskPG


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
    text = plan(db, app.store.q.claim_jobs, {"queues": ["default"], "limit": 100, "worker_id": "w"})
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
