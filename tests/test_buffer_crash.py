"""Kill the flusher at every step, restart Redis, stop Postgres mid-flush: every envelope lands once."""

from __future__ import annotations

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

from taskpg import TaskPG, migrate
from taskpg.buffer import buffer_key
from taskpg.embedded import LocalCluster, _local_binaries
from taskpg.flusher import Flusher

if TYPE_CHECKING:
    from collections.abc import Iterator

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def jobs_in(dsn: str, schema: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f'SELECT count(*), count(DISTINCT id) FROM "{schema}".jobs').fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def taskpg_keys(client: redis.Redis, schema: str) -> list[bytes]:
    return sorted(k for k in client.scan_iter(f"taskpg:{schema}:*") if b"flusher-lock" not in k)


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
        "PYTHONPATH": str(TESTS),
    }
    victim = subprocess.Popen(
        [sys.executable, str(TESTS / "flusher_victim.py")],
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

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.folder),
            ],
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
