"""Postgres going away: the worker reconnects and LISTEN recovers; enqueue fails clearly, loses nothing.

These tests restart a private Postgres cluster they start themselves (the machine's initdb/pg_ctl),
so the shared server is never disturbed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from taskpg import DatabaseUnavailable, TaskPG, migrate
from taskpg.embedded import LocalCluster, _local_binaries

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_local_binaries() is None, reason="needs PostgreSQL's initdb/pg_ctl on this machine"),
]


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = Path("/tmp") / f"taskpg-outage-{time.monotonic_ns()}"  # short: Unix socket paths are limited
    base.mkdir()
    base.chmod(0o755)
    private = LocalCluster(base / "pgdata")
    private.start()
    yield private
    if private.is_running():
        private.stop()


def started_after(app: TaskPG, job_id: str) -> float:
    with psycopg.connect(app.dsn) as conn:
        row = conn.execute(
            f'SELECT EXTRACT(EPOCH FROM started_at - created_at) FROM "{app.schema}".jobs WHERE id = %s', (job_id,)
        ).fetchone()
    assert row is not None
    return float(row[0])


def test_worker_survives_a_postgres_restart_and_listen_recovers(cluster: LocalCluster, run_worker: Any) -> None:
    migrate.upgrade(cluster.dsn, "taskpg")
    app = TaskPG(cluster.dsn)

    @app.task
    def echo(x: int) -> int:
        return x

    with run_worker(app, poll_interval=60) as worker:  # only NOTIFY can wake it quickly
        assert echo.delay(1).get(timeout=10) == 1
        cluster.restart()
        # Jobs enqueued while the worker is reconnecting are not lost.
        during = echo.delay(2)
        assert during.get(timeout=20) == 2
        deadline = time.monotonic() + 20
        while not worker.listening.is_set():
            assert time.monotonic() < deadline, "the listener did not reconnect"
            time.sleep(0.05)
        time.sleep(0.3)
        after = echo.delay(3)
        assert after.get(timeout=10) == 3
        assert started_after(app, after.id) < 0.5, "pickup after the restart fell back to polling"
    app.close()


def test_enqueue_while_postgres_is_down_raises_and_writes_nothing(cluster: LocalCluster) -> None:
    migrate.upgrade(cluster.dsn, "taskpg")
    app = TaskPG(cluster.dsn)
    app.store.connections.connect_timeout = 2

    @app.task
    def echo(x: int) -> int:
        return x

    echo.delay(0)  # the pool is open and warm
    cluster.stop()
    with pytest.raises(DatabaseUnavailable, match="postgres"):
        echo.delay(1)
    with pytest.raises(DatabaseUnavailable):
        echo.delay_many([(2,), (3,)])
    cluster.start()
    handle = echo.delay(4)  # the pool recovers by itself once the server is back
    with psycopg.connect(cluster.dsn) as conn:
        args = [r[0] for r in conn.execute("SELECT args FROM taskpg.jobs ORDER BY created_at").fetchall()]
    assert args == [[0], [4]]
    assert handle.status == "PENDING"
    app.close()
