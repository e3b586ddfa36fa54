"""examples/webhook_receiver.py absorbs a burst of webhooks through Redis and every job runs exactly once."""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis
from example_runner import run_example

if TYPE_CHECKING:
    import psycopg


def test_webhook_receiver_example(pg_dsn: str, schema: str, redis_url: str, db: psycopg.Connection) -> None:
    stdout = run_example(
        "webhook_receiver.py", "--burst", "500", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema, TASKPG_REDIS_URL=redis_url
    )
    lines = stdout.splitlines()
    assert any(line.startswith("received 500 webhooks in ") for line in lines), stdout
    # Every webhook went through Redis: none fell back to a direct insert.
    assert "buffered: 500 envelope(s) waiting in Redis, 0 written straight to Postgres" in lines, stdout
    assert any(line.startswith("processed 500 jobs in ") for line in lines), stdout

    # Postgres holds exactly the 500 jobs, once each, all succeeded, with the posted events as kwargs.
    rows = db.execute(f'SELECT id, task, queue, state, kwargs, result FROM "{schema}".jobs').fetchall()
    assert len(rows) == 500
    assert len({row[0] for row in rows}) == 500
    assert {(task, queue, state) for _, task, queue, state, _, _ in rows} == {
        ("webhooks.handle_event", "webhooks", "succeeded")
    }
    assert sorted(kwargs["id"] for *_, kwargs, _ in rows) == list(range(500))
    assert sorted(result for *_, result in rows) == list(range(500))

    # The example cleaned up after itself in Redis.
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(f"taskpg:{schema}:*")) == []
    client.close()
