"""docs/buffer.md: the Redis spike buffer against real Redis and Postgres: nothing lost, nothing doubled."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import redis
from support.example_runner import run_example
from support.paths import SUPPORT
from support.waiting import wait_for

from taskpg import TaskPG, migrate
from taskpg.buffer import buffer_key
from taskpg.cli import main
from taskpg.embedded import LocalCluster, _local_binaries
from taskpg.flusher import Flusher

if TYPE_CHECKING:
    from collections.abc import Iterator

    from taskpg.events import JobEvent


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
    assert len(dead) == 4
    assert "is not UTF-8" in dead["\\xff\\xfe not json"]  # its bytes kept as escapes, not U+FFFD
    assert "not a JSON object" in dead["[1, 2, 3]"]
    # A task this app does not declare is not the flusher's to judge: it lands, and its worker decides.
    assert ("nobody.knows", "available", [1]) in [(task, state, args) for task, state, args, _ in rows]
    assert "'args' must be a list" in dead[raw[3].decode()]
    assert "queue=" in dead[raw[4].decode()]
    available = sorted((t, a) for t, s, a, _ in rows if s == "available")
    assert available == [("known", [5]), ("nobody.knows", [1])]


def test_flush_without_the_app_keeps_jobs_it_does_not_know_runnable(
    pg_dsn: str, migrated_schema: str, redis_url: str, db: psycopg.Connection, run_worker: Any, cli: Any
) -> None:
    """`taskpg flush` with no -A knows no task: before, it turned every buffered job into a dead one. Now they
    land as ordinary jobs with their arguments, and a worker of the app that declares the task runs them."""
    producer = TaskPG(pg_dsn, schema=migrated_schema, redis_url=redis_url)

    @producer.task(name="buffered.double", queue="math", max_retries=1)
    def double(n: int) -> int:
        return 2 * n

    try:
        handles = [double.apply_async((n,), via="buffer") for n in range(3)]
        result = cli(migrated_schema, "flush", "--redis-url", redis_url)  # no -A: an app without tasks
        assert result.code == 0, result.err
        rows = db.execute(f'SELECT state, queue, max_attempts FROM "{migrated_schema}".jobs').fetchall()
        assert rows == [("available", "math", 2)] * 3  # the envelope carried the declaration's values
        with run_worker(producer, queues=["math"]):
            assert [h.get(timeout=10) for h in handles] == [0, 2, 4]
    finally:
        producer.close()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"taskpg:{migrated_schema}:*"):
            client.delete(key)


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


def test_a_flusher_sees_no_loss_while_producers_push_as_it_flushes(
    buffered_app: TaskPG, db: psycopg.Connection
) -> None:
    """The loss watch (lists shorter than seen, less what was moved) must never cry wolf on busy lists."""

    @buffered_app.task
    def item(n: int) -> None:
        return None

    flusher = Flusher(buffered_app, interval=0.01)  # each look flushes what waits
    flusher.start()

    def produce(start: int) -> None:
        for number, chunk in enumerate(range(start, start + 5000, 250)):
            item.delay_many(((n,) for n in range(chunk, chunk + 250)), via="buffer")
            item.apply_async(args=(-chunk,), via="buffer")
            if number % 5 == 4:  # let the flusher take some while the others go on pushing
                assert flusher.signals.wait_for("flushed", flusher.signals.count("flushed") + 1, timeout=10)

    producers = [threading.Thread(target=produce, args=(n * 5000,)) for n in range(4)]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    wait_for(lambda: job_count(db, buffered_app)[0] == 20_080, timeout=30, message="every pushed job flushed")
    flusher.stop()
    flusher.join(5)
    assert flusher.signals.count("flushed") >= 4  # it flushed while they pushed
    assert buffered_app.store.buffer_losses().events == 0


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


def test_lone_surrogates_are_refused_on_every_enqueue_path(buffered_app: TaskPG, db: psycopg.Connection) -> None:
    from taskpg import SerializationError

    @buffered_app.task(name="text")
    def text(value: str) -> None:
        return None

    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what reading Latin-1 bytes as UTF-8 leaves
    for enqueue in (
        lambda: text.delay(bad),
        lambda: text.delay_many([(bad,)]),
        lambda: text.apply_async(kwargs={"value": bad}),
        lambda: text.apply_async(args=(bad,), via="buffer"),
    ):
        with pytest.raises(SerializationError, match="lone surrogate"):
            enqueue()
    assert db.execute(f'SELECT count(*) FROM "{buffered_app.schema}".jobs').fetchone() == (0,)
    assert redis.Redis.from_url(buffered_app.redis_url or "").llen(buffer_key(buffered_app.schema)) == 0


def test_hostile_envelopes_go_dead_alone_and_the_batch_lands(
    buffered_app: TaskPG, redis_url: str, db: psycopg.Connection
) -> None:
    """Pushed by another producer: bytes that are not UTF-8, a lone surrogate, a raw NUL, a NUL in the task
    name. Each becomes a dead job that keeps its bytes (escaped) and says why; the good envelope lands."""

    @buffered_app.task(name="text")
    def text(value: str) -> None:
        return None

    hostile = {
        b'{"task":"text","args":["caf\xe9"]}': "not UTF-8",
        b'{"task":"text","args":["\\ud800"]}': "lone surrogate",
        b'{"task":"text","args":["a\x00b"]}': "not JSON",
        b'{"task":"te\\u0000xt","args":["ok"]}': "task name",
    }
    redis.Redis.from_url(redis_url).rpush(buffer_key(buffered_app.schema), *hostile, b'{"task":"text","args":["fine"]}')
    assert Flusher(buffered_app).drain() == 5
    rows = db.execute(f'SELECT state, task, args, errors FROM "{buffered_app.schema}".jobs').fetchall()
    assert sorted(state for state, *_ in rows) == ["available", "dead", "dead", "dead", "dead"]
    dead = {json.dumps(args): errors[-1]["message"] for state, task, args, errors in rows if state == "dead"}
    assert all("\x00" not in raw for raw in dead)
    for reason in hostile.values():
        assert any(reason in message for message in dead.values()), (reason, dead)
    assert any("caf\\\\xe9" in raw for raw in dead), dead  # the byte kept as an escape, not U+FFFD
    assert {task for state, task, *_ in rows if state == "dead"} <= {"text", "taskpg.undecodable_envelope"}


def test_a_batch_postgres_refuses_goes_in_by_halves_and_only_the_refused_envelope_goes_dead(
    buffered_app: TaskPG, db: psycopg.Connection
) -> None:
    """A value taskpg's checks let through but Postgres refuses (here a CHECK constraint of the user's):
    the batch is split until that envelope stands alone; it goes dead with its raw text, the rest land."""

    @buffered_app.task(name="word")
    def word(value: str) -> None:
        return None

    schema = buffered_app.schema
    db.execute(f"""ALTER TABLE "{schema}".jobs ADD CONSTRAINT no_poison CHECK (NOT args @> '["poison"]')""")
    values = [f"w{n}" for n in range(1000)]
    values[613] = "poison"
    ids = word.delay_many(((v,) for v in values), via="buffer")
    pushed = redis.Redis.from_url(buffered_app.redis_url or "").lindex(buffer_key(schema), 613)
    assert Flusher(buffered_app, batch_size=1000).drain() == 1000
    states = dict(db.execute(f'SELECT state, count(*) FROM "{schema}".jobs GROUP BY 1').fetchall())
    assert states == {"available": 999, "dead": 1}
    row = db.execute(f'SELECT id::text, task, args, errors FROM "{schema}".jobs WHERE state = %s', ("dead",)).fetchone()
    assert row is not None
    job_id, task, args, errors = row
    assert (job_id, task) == (ids[613], "word")  # its own id and task: the handle finds it
    assert args == [pushed.decode()]  # the envelope's raw text, kept
    assert errors[-1]["type"] == "EnvelopeRejected" and "no_poison" in errors[-1]["message"]
    assert buffered_app.buffer.depth()[0] == 0


def test_keys_postgres_cannot_index_are_refused_at_enqueue_and_at_flush(
    buffered_app: TaskPG, db: psycopg.Connection
) -> None:
    from taskpg import ConfigurationError

    @buffered_app.task(name="page", unique_key="{url}")
    def page(url: str) -> None:
        return None

    long_url = "https://example.com/" + "a" * 3000  # over Postgres' index-row limit as a key
    for call in (lambda: page.delay(long_url), lambda: page.apply_async(args=(long_url,), via="buffer")):
        with pytest.raises(ConfigurationError, match="over the limit of 1024"):
            call()

    @buffered_app.task(name="odd_key", unique_key=lambda url: "\x00" + url)
    def odd_key(url: str) -> None:
        return None

    with pytest.raises(ConfigurationError, match="NUL"):
        odd_key.apply_async(args=("a",), via="buffer")
    foreign = [
        json.dumps({"task": "page", "args": ["x"], "unique_key": "page:" + "k" * 3000}),
        json.dumps({"task": "page", "args": ["y"], "unique_key": "page:a\u0000b"}),
        json.dumps({"task": "page", "args": ["z"], "unique_key": "page:z"}),
    ]
    buffered_app.buffer.client.rpush(buffer_key(buffered_app.schema), *foreign)
    assert Flusher(buffered_app).drain() == 3
    rows = db.execute(f'SELECT state, errors FROM "{buffered_app.schema}".jobs ORDER BY created_at, id').fetchall()
    reasons = sorted(errors[-1]["message"] for state, errors in rows if state == "dead")
    assert [state for state, _ in rows].count("available") == 1
    assert len(reasons) == 2
    assert "over the limit of 1024" in reasons[0] + reasons[1] and "NUL" in reasons[0] + reasons[1]


def test_one_size_limit_at_every_entry(
    pg_dsn: str, migrated_schema: str, redis_url: str, db: psycopg.Connection
) -> None:
    """max_payload_bytes holds the arguments on every path, the flush included; an envelope far over it is
    kept as a sample with its size, not whole."""
    from taskpg import SerializationError

    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=redis_url, max_payload_bytes=1000)

    @app.task(name="note")
    def note(text: str) -> None:
        return None

    with psycopg.connect(pg_dsn) as conn:
        calls = [
            lambda: note.delay("x" * 1000),
            lambda: note.delay_many([("x" * 1000,)]),
            lambda: note.apply_async(args=("x" * 1000,), via="buffer"),
            lambda: note.delay_many([("x" * 1000,)], via="buffer"),
            lambda: note.apply_async(args=("x" * 1000,), connection=conn),
        ]
        for call in calls:
            with pytest.raises(SerializationError, match="over the limit of 1000"):
                call()
    at_limit = note.apply_async(args=("x" * 994,), via="buffer")  # ["x..."] is 998 bytes: the envelope is larger
    client = app.buffer.client
    client.rpush(app.buffer.key, json.dumps({"task": "note", "args": ["y" * 5000]}))  # over, parsed
    client.rpush(app.buffer.key, json.dumps({"task": "note", "args": ["z" * 200_000]}))  # far over: not parsed
    assert Flusher(app).drain() == 3
    rows = db.execute(f'SELECT id::text, state, args, errors FROM "{migrated_schema}".jobs ORDER BY created_at, id')
    by_state: dict[str, list[Any]] = {}
    for job_id, state, args, errors in rows.fetchall():
        by_state.setdefault(state, []).append((job_id, args, errors[-1]["message"] if errors else None))
    assert [job_id for job_id, *_ in by_state["available"]] == [at_limit.id]
    dead = {("y" if "yyy" in args[0] else "z"): (len(args[0]), message) for _, args, message in by_state["dead"]}
    y_size, y_reason = dead["y"]
    assert "arguments take 5006 bytes as JSON, over the limit of 1000" in y_reason
    assert "first 4096 characters" in y_reason and y_size == 4096
    z_size, z_reason = dead["z"]
    assert "envelope takes 200030 bytes" in z_reason and z_size == 4096
    app.close()


def test_buffer_lists_are_configurable_and_several_are_flushed(
    pg_dsn: str, migrated_schema: str, redis_url: str, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seeds' producers push to a list of their own (queue:batch:processor); taskpg reads it, and more."""
    seeds_list, second = "queue:batch:processor", f"taskpg:{migrated_schema}:buffer"
    monkeypatch.setenv("TASKPG_BUFFER_LISTS", f"{seeds_list}, {second}")
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=redis_url)
    assert app.buffer_lists == (seeds_list, second)
    client = redis.Redis.from_url(redis_url)
    client.delete(seeds_list)
    try:

        @app.task(name="process")
        def process(item: int) -> None:
            return None

        mine = process.apply_async(args=(1,), via="buffer")  # producers push to the first list
        assert client.llen(seeds_list) == 1
        client.rpush(seeds_list, *[json.dumps({"kind": "process", "payload": {"item": n}}) for n in range(2, 5)])
        client.rpush(second, json.dumps({"task": "process", "args": [5]}))
        assert app.buffer.depth()[0] == 5
        flusher = Flusher(app, batch_size=2)
        assert flusher.drain() == 5
        rows = db.execute(f'SELECT args, kwargs FROM "{migrated_schema}".jobs').fetchall()
        items = sorted([*args, *kwargs.values()][0] for args, kwargs in rows)
        assert items == [1, 2, 3, 4, 5]
        assert app.AsyncResult(mine.id).status == "PENDING" and app.AsyncResult(mine.id).record() is not None
        assert client.llen(seeds_list) == client.llen(second) == 0
    finally:
        client.delete(seeds_list)
        app.close()


@pytest.mark.parametrize(
    ("lists", "message"),
    [
        ([], "name at least one"),
        (["has space"], "printable ASCII"),
        (["a", "a"], "named twice"),
        (["taskpg:x:processing"], "taskpg's own keys"),
    ],
)
def test_bad_buffer_list_names_are_refused(lists: list[str], message: str) -> None:
    from taskpg import ConfigurationError

    with pytest.raises(ConfigurationError, match=message):
        TaskPG("postgresql://unused", buffer_lists=lists)


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


# -- crashes: kill the flusher at every step, restart Redis, stop Postgres mid-flush: every envelope lands once


def jobs_in(dsn: str, schema: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f'SELECT count(*), count(DISTINCT id) FROM "{schema}".jobs').fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def taskpg_keys(client: redis.Redis, schema: str) -> list[bytes]:
    return sorted(k for k in client.scan_iter(f"taskpg:{schema}:*") if b"flusher-lock" not in k)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["moved", "copying", "committed"])
def test_sigkill_at_each_step_loses_and_doubles_nothing(
    buffered_app: TaskPG, pg_dsn: str, redis_url: str, step: str
) -> None:
    @buffered_app.task(name="crash.item")
    def item(n: int) -> None:
        return None

    total = 12_000
    item.delay_many(((n,) for n in range(total)), via="buffer")
    env = {
        **os.environ,
        "TASKPG_DSN": pg_dsn,
        "TASKPG_SCHEMA": buffered_app.schema,
        "TASKPG_REDIS_URL": redis_url,
        "VICTIM_STEP": step,
        "PYTHONPATH": str(SUPPORT),
    }
    victim = subprocess.Popen(
        [sys.executable, str(SUPPORT / "flusher_victim.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert victim.stdout is not None
        line = victim.stdout.readline()
        assert line.strip() == f"AT {step}", victim.stderr.read() if victim.stderr else line
        landed_before_kill = jobs_in(pg_dsn, buffered_app.schema)[0]
        assert landed_before_kill == (5_000 if step == "committed" else 0)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    # A new flusher waits for the dead one's lock to expire, recovers its batch, drains the rest.
    assert Flusher(buffered_app, batch_size=5_000).drain() >= total - landed_before_kill
    assert jobs_in(pg_dsn, buffered_app.schema) == (total, total)
    assert taskpg_keys(redis.Redis.from_url(redis_url), buffered_app.schema) == []


@pytest.mark.slow
def test_envelopes_without_ids_are_not_doubled_when_a_batch_is_written_again(
    buffered_app: TaskPG, redis_url: str, pg_dsn: str
) -> None:
    @buffered_app.task(name="webhooks.event")
    def event(**payload: Any) -> None:
        return None

    client = redis.Redis.from_url(redis_url)
    client.rpush(
        buffer_key(buffered_app.schema), *[f'{{"kind": "webhooks.event", "payload": {{"n": {n}}}}}' for n in range(100)]
    )

    def crash_after_commit(step: str) -> None:
        if step == "committed":
            raise RuntimeError("killed between the commit and the clean-up")

    with pytest.raises(RuntimeError):
        Flusher(buffered_app, on_step=crash_after_commit).drain()
    assert Flusher(buffered_app).drain() == 100  # the dead flusher's batch, recovered and written again
    assert jobs_in(pg_dsn, buffered_app.schema) == (100, 100)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, with an append-only file so that data survives a restart."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)),
            *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
        ]

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "private redis did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


# -- Redis that forgets (issue: durability) -------------------------------------------------------------


class ForgetfulRedis(PrivateRedis):
    """A private redis-server with the given settings (no persistence by default)."""

    def __init__(self, folder: Path, *settings: str) -> None:
        super().__init__(folder)
        self.settings = settings or ("--save", "", "--appendonly", "no")

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            *self.settings,
        ]


def _lost(db: psycopg.Connection, schema: str) -> list[tuple[str, int, str]]:
    return db.execute(f'SELECT list_name, lost, cause FROM "{schema}".buffer_losses ORDER BY id').fetchall()


@pytest.mark.slow
def test_a_redis_restart_without_persistence_is_noticed_and_counted(
    pg_dsn: str,
    migrated_schema: str,
    tmp_path: Path,
    db: psycopg.Connection,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = ForgetfulRedis(tmp_path)
    server.start()
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=server.url)
    try:

        @app.task(name="kept")
        def kept(n: int) -> None:
            return None

        flusher = Flusher(app, interval=3600)
        with caplog.at_level(logging.WARNING, logger="taskpg.flusher"):
            flusher.step()  # takes the lock; flushes the (empty) buffer once
        assert "keeps nothing on disk" in caplog.text  # said at the flusher's start
        kept.delay_many(((n,) for n in range(1000)), via="buffer")
        flusher.step()  # sees 1000 waiting (not due yet)
        server.stop()
        server.start()  # empty: it kept nothing
        with caplog.at_level(logging.ERROR, logger="taskpg.flusher"):
            for _ in range(3):
                try:
                    flusher.step()
                except Exception:
                    app.buffer.client.connection_pool.disconnect()
        assert _lost(db, migrated_schema) == [
            (
                app.buffer.key,
                1000,
                "Redis restarted without them (no persistence, or a failover to a replica that lacked them)",
            )
        ]
        assert "1000 envelope(s) vanished" in caplog.text
        main(["status", "--dsn", pg_dsn, "--schema", migrated_schema, "--redis-url", server.url])
        out = capsys.readouterr().out
        assert "lost at least 1000 envelope(s)" in out
    finally:
        app.close()
        server.stop()


@pytest.mark.slow
def test_eviction_under_allkeys_lru_is_warned_about_and_counted(
    pg_dsn: str, migrated_schema: str, tmp_path: Path, db: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    server = ForgetfulRedis(
        tmp_path, "--save", "", "--appendonly", "no", "--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"
    )
    server.start()
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=server.url)
    try:

        @app.task(name="big")
        def big(text: str) -> None:
            return None

        flusher = Flusher(app, interval=3600)
        with caplog.at_level(logging.WARNING, logger="taskpg.flusher"):
            flusher.step()
        assert "maxmemory-policy is allkeys-lru" in caplog.text
        big.delay_many((("x" * 500,) for _ in range(2000)), via="buffer")  # ~1.2 MB
        flusher.step()
        waiting = app.buffer.depth()[0]
        assert waiting == 2000
        filler = redis.Redis.from_url(server.url)
        for n in range(200):  # 8 MB of other keys: Redis evicts
            filler.set(f"filler:{n}", "y" * 40_000)
        flusher.step()
        losses = _lost(db, migrated_schema)
        assert losses and sum(n for _, n, _ in losses) >= 1
        assert all("evicted" in cause for *_, cause in losses)
    finally:
        app.close()
        server.stop()


@pytest.mark.slow
def test_redis_restart(pg_dsn: str, migrated_schema: str, private_redis: PrivateRedis, run_worker: Any) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=private_redis.url)

    @app.task(via="buffer")
    def item(n: int) -> int:
        return n

    item.delay_many([(n,) for n in range(1_000)])
    private_redis.stop()
    during = item.delay(1_000)  # Redis is down: written to Postgres directly
    assert app.buffer.fallbacks == 1
    private_redis.start()  # the 1,000 envelopes survive in the append-only file
    after = item.delay(1_001)  # buffered again
    assert app.buffer.fallbacks == 1
    with run_worker(app, concurrency=8):
        assert during.get(timeout=20) == 1_000
        assert after.get(timeout=20) == 1_001
        deadline = time.monotonic() + 30
        while jobs_in(pg_dsn, migrated_schema)[0] < 1_002 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert jobs_in(pg_dsn, migrated_schema) == (1_002, 1_002)
    app.close()


@pytest.mark.slow
@pytest.mark.skipif(_local_binaries() is None, reason="needs PostgreSQL's initdb/pg_ctl on this machine")
def test_postgres_down_during_a_flush(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = Path("/tmp") / f"taskpg-flush-{time.monotonic_ns()}"
    base.mkdir()
    base.chmod(0o755)
    cluster = LocalCluster(base / "pgdata")
    dsn = cluster.start()
    schema = f"t_flush_{os.getpid()}"
    migrate.upgrade(dsn, schema)
    app = TaskPG(dsn, schema=schema, redis_url=redis_url)
    app.store.connections.connect_timeout = 1

    @app.task
    def item(n: int) -> None:
        return None

    try:
        item.delay_many([(n,) for n in range(500)], via="buffer")
        cluster.stop()
        flusher = Flusher(app, lock_ttl=30)
        result: list[int] = []
        worker = threading.Thread(target=lambda: result.append(flusher.drain()))
        worker.start()
        time.sleep(2)  # the flusher is retrying; the batch waits in its processing list
        assert worker.is_alive()
        client = redis.Redis.from_url(redis_url)
        assert [client.llen(key) for key in flusher._processing_lists()] == [500]
        cluster.start()
        worker.join(30)
        assert result == [500]
        assert jobs_in(dsn, schema) == (500, 500)
    finally:
        app.close()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"taskpg:{schema}:*"):
            client.delete(key)
        if cluster.is_running():
            cluster.stop()


# -- examples/webhook_receiver.py: a burst of webhooks through Redis, every job run exactly once --------


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


def test_a_lost_reply_to_the_move_loses_nothing(pg_dsn: str, migrated_schema: str, db: psycopg.Connection) -> None:
    """With retry_on_timeout (a common client setting) a lost reply makes redis-py send the move again.
    The second move must not append the next batch to the same processing list: it returns the batch
    already moved, and every envelope lands once."""
    from support.lossy_proxy import LossyProxy

    with LossyProxy(6379) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}/0?retry_on_timeout=true&socket_timeout=0.5"
        app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=url)

        @app.task(name="buffered.record")
        def record(n: int) -> int:
            return n

        try:
            for n in range(150):
                record.apply_async((n,), via="buffer")
            flusher = Flusher(app, batch_size=50)
            proxy.drop_reply_to(b"$3\r\nSET\r\n")  # the lock's SET NX: sent again, it must still count as ours
            assert flusher.acquire()
            flusher.release()
            proxy.drop_reply_to(b"EVALSHA")  # the first move's reply
            assert flusher.drain() == 150
            assert proxy.dropped == 2
        finally:
            app.close()
            client = redis.Redis()
            keys = list(client.scan_iter(f"taskpg:{migrated_schema}:*"))
            assert keys == []  # buffer and processing lists all gone
    rows = db.execute(f'SELECT args ->> 0 FROM "{migrated_schema}".jobs').fetchall()
    assert sorted(int(n) for (n,) in rows) == list(range(150))  # each once


def test_a_move_whose_reply_is_lost_is_not_counted_as_a_loss(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection
) -> None:
    """Without client retries, a lost reply to the move raises; the envelopes sit in this flusher's processing
    list, not lost: the loss watch must not count them (and the next step writes them)."""
    from support.lossy_proxy import LossyProxy

    with LossyProxy(6379) as proxy:
        app = TaskPG(pg_dsn, schema=migrated_schema, redis_url=f"redis://127.0.0.1:{proxy.port}/0?socket_timeout=0.5")

        @app.task(name="buffered.kept")
        def kept(n: int) -> int:
            return n

        try:
            kept.delay_many(((n,) for n in range(150)), via="buffer")
            flusher = Flusher(app, batch_size=50, interval=0)
            proxy.drop_reply_to(b"EVALSHA")
            with pytest.raises(redis.TimeoutError):
                flusher.step()  # looked (150 waiting), moved 50, never heard back
            app.buffer.client.connection_pool.disconnect()
            flusher.redis.connection_pool.disconnect()
            for _ in range(4):
                flusher.step()
            assert proxy.dropped == 1
        finally:
            app.close()
            client = redis.Redis()
            for key in client.scan_iter(f"taskpg:{migrated_schema}:*"):
                client.delete(key)
    assert db.execute(f'SELECT count(*) FROM "{migrated_schema}".jobs').fetchone() == (150,)
    assert db.execute(f'SELECT count(*) FROM "{migrated_schema}".buffer_losses').fetchone() == (0,)


def test_a_buffered_enqueue_with_events_needs_no_postgres_and_its_event_comes_at_the_flush(
    migrated_schema: str, redis_url: str, pg_dsn: str
) -> None:

    offline = TaskPG(
        "postgresql://postgres@127.0.0.1:1/nothing", schema=migrated_schema, redis_url=redis_url, events=True
    )

    @offline.task(name="buffered.evented")
    def evented(n: int) -> int:
        return n

    handle = evented.apply_async((1,), via="buffer")  # Postgres unreachable: the push alone, no event yet
    offline.close()
    online = TaskPG(pg_dsn, schema=migrated_schema, redis_url=redis_url, events=True)
    seen: list[JobEvent] = []
    listening = threading.Event()
    reader = threading.Thread(
        target=lambda: seen.extend(online.events(timeout=2, on_listening=listening.set)), daemon=True
    )
    reader.start()
    try:
        assert listening.wait(10)
        assert Flusher(online).drain() == 1
        reader.join(15)
    finally:
        online.close()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"taskpg:{migrated_schema}:*"):
            client.delete(key)
    assert [(e.type, e.job_id) for e in seen] == [("enqueued", handle.id)]
