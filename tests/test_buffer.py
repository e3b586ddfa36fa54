"""The Redis spike buffer against real Redis and Postgres: nothing lost, nothing doubled."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import time
from typing import Any

import psycopg
import pytest
import redis

from taskpg import TaskPG
from taskpg.buffer import buffer_key
from taskpg.flusher import Flusher


def states(db: psycopg.Connection, app: TaskPG) -> dict[str, int]:
    rows = db.execute(f'SELECT state, count(*) FROM "{app.schema}".jobs GROUP BY state').fetchall()
    return {state: int(count) for state, count in rows}


def job_count(db: psycopg.Connection, app: TaskPG) -> tuple[int, int]:
    row = db.execute(f'SELECT count(*), count(DISTINCT id) FROM "{app.schema}".jobs').fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_100k_buffered_jobs_land_exactly_once(buffered_app: TaskPG, db: psycopg.Connection) -> None:
    @buffered_app.task
    def item(n: int) -> None:
        return None

    ids = item.delay_many(((n,) for n in range(100_000)), via="buffer")
    assert job_count(db, buffered_app) == (0, 0)  # still in Redis
    assert buffered_app.buffer.depth()[0] == 100_000
    assert Flusher(buffered_app, batch_size=30_000).drain() == 100_000
    assert job_count(db, buffered_app) == (100_000, 100_000)
    sample = db.execute(f'SELECT args FROM "{buffered_app.schema}".jobs WHERE id = %s', (ids[777],)).fetchone()
    assert sample == ([777],)
    assert buffered_app.buffer.depth()[0] == 0


def test_buffered_handle_has_its_final_id_and_get_works(buffered_app: TaskPG, run_worker: Any) -> None:
    @buffered_app.task(via="buffer")
    def double(x: int) -> int:
        return 2 * x

    @buffered_app.task
    def triple(x: int) -> int:
        return 3 * x

    handle = double.delay(21)  # per-task choice
    other = triple.apply_async(args=(5,), via="buffer")  # per-call choice
    assert buffered_app.buffer.depth()[0] == 2
    with run_worker(buffered_app):  # the worker runs the flusher too
        assert handle.get(timeout=15) == 42
        assert other.get(timeout=15) == 15


def test_app_default_via_buffer_and_transactions_still_go_direct(
    pg_dsn: str, migrated_schema: str, redis_url: str, db: psycopg.Connection
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=redis_url, default_via="buffer")

    @app.task
    def noop() -> None:
        return None

    noop.delay()
    with psycopg.connect(pg_dsn) as conn:
        in_tx = noop.apply_async(connection=conn)  # joins the caller's transaction: not buffered
    assert app.buffer.depth()[0] == 1
    assert job_count(db, app) == (1, 1)
    assert app.AsyncResult(in_tx.id).status == "PENDING"
    redis.Redis.from_url(redis_url).delete(buffer_key(migrated_schema))
    app.close()


def test_redis_down_at_enqueue_falls_back_to_postgres(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url="redis://127.0.0.1:1/0")  # nothing listens there

    @app.task(via="buffer")
    def important(n: int) -> None:
        return None

    caplog.set_level(logging.WARNING, logger="taskpg.buffer")
    important.delay(1)
    important.delay(2)
    important.delay_many([(3,), (4,)])
    assert job_count(db, app) == (4, 4)
    assert app.buffer.fallbacks == 4
    assert caplog.text.count("Redis is unreachable") == 1  # once per outage, not per job
    app.close()


def test_bad_envelopes_become_dead_jobs_with_the_raw_payload(
    buffered_app: TaskPG, redis_url: str, db: psycopg.Connection
) -> None:
    @buffered_app.task(name="known")
    def known(a: int) -> None:
        return None

    raw = [
        b"\xff\xfe not json",
        b"[1, 2, 3]",
        json.dumps({"task": "nobody.knows", "args": [1]}).encode(),
        json.dumps({"task": "known", "args": "not-a-list"}).encode(),
        json.dumps({"task": "known", "args": [1], "queue": "bad queue!"}).encode(),
        json.dumps({"task": "known", "args": [5]}).encode(),  # the one good envelope
    ]
    redis.Redis.from_url(redis_url).rpush(buffer_key(buffered_app.schema), *raw)
    assert Flusher(buffered_app).drain() == 6
    rows = db.execute(
        f'SELECT task, state, args, errors FROM "{buffered_app.schema}".jobs ORDER BY created_at, id'
    ).fetchall()
    assert len(rows) == 6
    dead = {args[0]: errors[0]["message"] for task, state, args, errors in rows if state == "dead"}
    assert len(dead) == 5
    assert "is not JSON" in dead["\ufffd\ufffd not json"]
    assert "not a JSON object" in dead["[1, 2, 3]"]
    assert "unknown task 'nobody.knows'" in dead[raw[2].decode()]
    assert "'args' must be a list" in dead[raw[3].decode()]
    assert "queue=" in dead[raw[4].decode()]
    assert [(t, s, a) for t, s, a, _ in rows if s == "available"] == [("known", "available", [5])]


def test_kind_payload_envelope_from_redis_cli(buffered_app: TaskPG, redis_url: str, run_worker: Any) -> None:
    seen: list[dict[str, Any]] = []

    @buffered_app.task(name="webhooks.stripe")
    def on_stripe(**event: Any) -> None:
        seen.append(event)

    client = redis.Redis.from_url(redis_url)
    host, port = client.connection_pool.connection_kwargs["host"], client.connection_pool.connection_kwargs["port"]
    envelope = json.dumps({"kind": "webhooks.stripe", "payload": {"type": "charge.succeeded", "amount": 1200}})
    subprocess.run(
        ["redis-cli", "-h", str(host), "-p", str(port), "RPUSH", buffer_key(buffered_app.schema), envelope],
        check=True,
        capture_output=True,
    )
    with run_worker(buffered_app):
        deadline = time.monotonic() + 15
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    assert seen == [{"type": "charge.succeeded", "amount": 1200}]


def test_buffered_countdown_counts_from_the_push(buffered_app: TaskPG, db: psycopg.Connection) -> None:
    @buffered_app.task
    def later() -> None:
        return None

    handle = later.apply_async(countdown=60, via="buffer")
    time.sleep(0.5)
    Flusher(buffered_app).drain()
    run_at, created_at, state = db.execute(
        f'SELECT run_at, created_at, state FROM "{buffered_app.schema}".jobs WHERE id = %s', (handle.id,)
    ).fetchone()  # type: ignore[misc]
    assert state == "scheduled"
    assert 58 < (run_at - created_at).total_seconds() < 60  # measured from the push, not the flush


def test_only_one_flusher_holds_the_lock(buffered_app: TaskPG) -> None:
    first, second = Flusher(buffered_app), Flusher(buffered_app)
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


def test_status_shows_buffer_depth_and_oldest(buffered_app: TaskPG, capsys: pytest.CaptureFixture[str]) -> None:
    from taskpg.cli import main

    @buffered_app.task
    def noop() -> None:
        return None

    noop.apply_async(via="buffer")
    noop.apply_async(via="buffer")
    where = ["--dsn", buffered_app.dsn, "--schema", buffered_app.schema, "--redis-url", str(buffered_app.redis_url)]
    assert main(["status", *where, "--json"]) == 0
    buffer = json.loads(capsys.readouterr().out)["buffer"]
    assert buffer["depth"] == 2
    age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(buffer["oldest_enqueued_at"])
    assert 0 <= age.total_seconds() < 30
    assert main(["status", *where]) == 0
    assert "redis buffer: 2 envelope(s) waiting" in capsys.readouterr().out
    assert main(["flush", *where]) == 0
    assert "flushed 2 envelope(s)" in capsys.readouterr().out


def test_flusher_thread_stops_cleanly(buffered_app: TaskPG, db: psycopg.Connection) -> None:
    @buffered_app.task
    def noop() -> None:
        return None

    flusher = Flusher(buffered_app, interval=0.1)
    flusher.start()
    noop.delay_many([()] * 500, via="buffer")
    deadline = time.monotonic() + 10
    while job_count(db, buffered_app)[0] < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    flusher.stop()
    flusher.join(5)
    assert not flusher.running
    assert job_count(db, buffered_app) == (500, 500)
    assert not flusher.redis.exists(flusher.lock)  # released on the way out


def test_nul_characters_are_refused_at_enqueue_and_at_flush(
    buffered_app: TaskPG, redis_url: str, db: psycopg.Connection
) -> None:
    from taskpg import SerializationError

    @buffered_app.task(name="text")
    def text(value: str) -> None:
        return None

    with pytest.raises(SerializationError, match="NUL"):
        text.delay("a\x00b")
    with pytest.raises(SerializationError, match="NUL"):
        text.apply_async(args=("a\x00b",), via="buffer")
    raw = json.dumps({"task": "text", "args": ["a\x00b"]})  # pushed by another producer
    redis.Redis.from_url(redis_url).rpush(
        buffer_key(buffered_app.schema), raw, json.dumps({"task": "text", "args": ["ok"]})
    )
    assert Flusher(buffered_app).drain() == 2
    rows = db.execute(f'SELECT state, errors FROM "{buffered_app.schema}".jobs ORDER BY state').fetchall()
    assert [state for state, _ in rows] == ["available", "dead"]
    assert "NUL" in rows[1][1][0]["message"]


def test_odd_envelopes_never_block_the_flusher(buffered_app: TaskPG, redis_url: str, db: psycopg.Connection) -> None:
    @buffered_app.task(name="known")
    def known(a: int = 0) -> None:
        return None

    odd = [
        {"task": "known", "id": 12345},
        {"task": "known", "countdown": 30, "enqueued_at": "2026-01-01T00:00:00"},  # no time zone
        {"task": "known", "countdown": 1e12},
        {"task": "known", "max_attempts": 2**40},
    ]
    fine = [{"task": "known", "priority": None, "max_attempts": None, "args": [1]}]
    redis.Redis.from_url(redis_url).rpush(buffer_key(buffered_app.schema), *[json.dumps(e) for e in odd + fine])
    assert Flusher(buffered_app).drain() == 5
    states = dict(db.execute(f'SELECT state, count(*) FROM "{buffered_app.schema}".jobs GROUP BY 1').fetchall())
    assert states == {"dead": 4, "available": 1}


def test_envelope_holding_the_batch_separator_is_still_read_alone(
    buffered_app: TaskPG, redis_url: str, db: psycopg.Connection
) -> None:
    """The move joins a batch with ASCII RS (one Redis reply); a raw RS in a (non-JSON) envelope
    makes the flusher read the batch as a list instead, so envelopes are never split or merged."""

    @buffered_app.task(name="known")
    def known(a: int = 0) -> None:
        return None

    pushed = ["not json \x1e and more", json.dumps({"task": "known", "args": [1]}), "\x1e"]
    redis.Redis.from_url(redis_url).rpush(buffer_key(buffered_app.schema), *pushed)
    assert Flusher(buffered_app).drain() == 3
    rows = db.execute(f'SELECT state, args FROM "{buffered_app.schema}".jobs ORDER BY state, args::text').fetchall()
    assert [state for state, _ in rows] == ["available", "dead", "dead"]
    assert sorted(row[1][0] for row in rows[1:]) == sorted(["not json \x1e and more", "\x1e"])
