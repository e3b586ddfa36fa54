"""Test fixtures: a real Postgres (and Redis), an isolated, migrated schema per test.

The database is TASKPG_TEST_DSN, else the local server at 127.0.0.1:5432 when it answers, else
an embedded Postgres started for the session (set TASKPG_TEST_EMBEDDED=1 to force that).
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from taskpg import TaskPG, embedded, migrate
from taskpg.worker import Worker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The DSN of the Postgres server the tests use."""
    explicit = os.environ.get("TASKPG_TEST_DSN")
    if explicit:
        return explicit
    if not os.environ.get("TASKPG_TEST_EMBEDDED") and _reachable(LOCAL_DSN):
        return LOCAL_DSN
    data_dir = Path(os.environ.get("TASKPG_TEST_DATA_DIR") or tmp_path_factory.mktemp("embedded"))
    return embedded.start(data_dir)


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    """A fresh, unmigrated Postgres schema name, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    drop_schema(pg_dsn, name)


@pytest.fixture
def migrated_schema(pg_dsn: str, schema: str) -> str:
    """A fresh schema migrated to head."""
    migrate.upgrade(pg_dsn, schema)
    return schema


@pytest.fixture
def app(pg_dsn: str, migrated_schema: str) -> Iterator[TaskPG]:
    """An app on its own migrated schema."""
    application = TaskPG(pg_dsn, schema=migrated_schema)
    yield application
    application.close()


@pytest.fixture
def db(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """A plain autocommit connection for looking at rows directly."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


class RunningWorker:
    """A Worker running in a background thread of the test process."""

    def __init__(self, app: TaskPG, **settings: Any) -> None:
        settings.setdefault("concurrency", 4)
        settings.setdefault("grace", 5)
        self.worker = Worker(app, **settings)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.exit_code = self.worker.run()

    def __enter__(self) -> Worker:
        self.thread.start()
        assert self.worker.started.wait(10), "worker did not start"
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "worker did not stop"


@pytest.fixture
def run_worker() -> Callable[..., RunningWorker]:
    """``with run_worker(app, concurrency=2) as worker: ...`` runs a worker for the block."""
    return RunningWorker


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis the tests use (TASKPG_TEST_REDIS_URL, else the local server); skips when none answers,
    fails instead when TASKPG_REQUIRE_REDIS is set (as ``.ci/run`` does)."""
    import redis

    url = os.environ.get("TASKPG_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.ConnectionError:
        if os.environ.get("TASKPG_REQUIRE_REDIS"):  # CI: a test that needs Redis must run, not skip
            pytest.fail(f"TASKPG_REQUIRE_REDIS is set and no Redis answers at {url}")
        pytest.skip(f"no Redis at {url}")
    return url


@pytest.fixture
def buffered_app(pg_dsn: str, migrated_schema: str, redis_url: str) -> Iterator[TaskPG]:
    """An app on its own schema with the Redis buffer enabled; its Redis keys are removed afterwards."""
    import redis

    application = TaskPG(pg_dsn, schema=migrated_schema, redis_url=redis_url)
    yield application
    application.close()
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"taskpg:{migrated_schema}:*"))
    if keys:
        client.delete(*keys)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With TASKPG_NO_SKIPS set (``.ci/run`` sets it), a skipped test is a failed test: in CI a test
    that did not run because something is missing must turn the run red."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("TASKPG_NO_SKIPS") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped, but TASKPG_NO_SKIPS is set: {report.longrepr}"
