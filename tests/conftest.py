"""Test fixtures: a real Postgres (and Redis), an isolated, migrated schema per test.

The database is TASKPG_TEST_DSN, else the local server at 127.0.0.1:5432 when it answers, else
an embedded Postgres started for the session (set TASKPG_TEST_EMBEDDED=1 to force that).
The fixtures that several test files share are here too; helpers that are not fixtures are in support/.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from taskpg import Task, TaskPG, embedded, migrate
from taskpg.cli import main
from taskpg.worker import Worker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytest.register_assert_rewrite("support")  # before the first import of it: its asserts explain themselves too

from support.paths import SUPPORT  # noqa: E402
from support.processes import TASKPG_ROOT, WorkerProcess  # noqa: E402

# The task modules in support/ (proc_tasks, beat_tasks, limit_tasks) are imported by their top-level names,
# in this process as in the worker and beat processes the tests start with PYTHONPATH=support.
sys.path.append(str(SUPPORT))

LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """The DSN of the Postgres server the tests use."""
    explicit = os.environ.get("TASKPG_TEST_DSN")
    if explicit:
        yield explicit
        return
    if not os.environ.get("TASKPG_TEST_EMBEDDED") and _reachable(LOCAL_DSN):
        yield LOCAL_DSN
        return
    given = os.environ.get("TASKPG_TEST_DATA_DIR")
    # A folder of our own under /tmp: as root the embedded server runs as 'postgres', who must reach it
    # (pytest's own temporary folders are private to root, and taskpg never widens a folder).
    data_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="taskpg-embedded-", dir="/tmp"))
    if not given:
        data_dir.chmod(0o755)
    yield embedded.start(data_dir)
    local = data_dir / "pgdata"  # a local initdb cluster outlives its process: stop it (pgserver stops itself)
    if (local / "PG_VERSION").exists():
        embedded.LocalCluster(local).stop()
    if not given:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def taskpg_dsn(pg_dsn: str) -> str:
    """The taskpg.testing plugin's fixtures (tests/test_testing.py) use this suite's Postgres."""
    return pg_dsn


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


@pytest.fixture
def spawn(pg_dsn: str, migrated_schema: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """``spawn(concurrency=4, grace=10, ...)`` starts a worker process; leftovers are killed after the test."""
    started: list[WorkerProcess] = []
    env = {
        **os.environ,
        "TASKPG_DSN": pg_dsn,
        "TASKPG_SCHEMA": migrated_schema,
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(TASKPG_ROOT)]),
        "PYTHONUNBUFFERED": "1",
    }

    def start(
        *, concurrency: int = 4, grace: float = 10, pool: str = "threads", prefetch: int | None = None
    ) -> WorkerProcess:
        argv = [sys.executable, "-m", "taskpg", "worker", "-A", "proc_tasks", "-Q", "default"]
        argv += ["-c", str(concurrency), "--pool", pool, "--grace", str(grace)]
        argv += ["--heartbeat", "0.5", "--rescue-after", "2", "--poll-interval", "1", "-l", "info"]
        if prefetch is not None:
            argv += ["--prefetch", str(prefetch)]
        worker = WorkerProcess(argv, env, tmp_path / f"worker-{len(started)}.stderr")
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.close()


@pytest.fixture
def tasks(app: TaskPG, db: psycopg.Connection) -> SimpleNamespace:
    """proc_tasks' tasks bound to the test's app (same names and options), and the executions table."""
    import proc_tasks

    db.execute(
        f'CREATE TABLE "{app.schema}".executions '
        "(job_id uuid NOT NULL, n int NOT NULL, pid int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    return SimpleNamespace(**{t.fn.__name__: Task(app, t.fn, t.name, t.options) for t in proc_tasks.app.tasks.values()})


@pytest.fixture
def cli(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., SimpleNamespace]:
    """``cli(schema, "status", "--json")`` -> exit code, stdout and stderr of ``taskpg status --json``."""

    def run(schema: str, *argv: str) -> SimpleNamespace:
        capsys.readouterr()
        code = main([*argv, "--dsn", pg_dsn, "--schema", schema])
        out, err = capsys.readouterr()
        return SimpleNamespace(code=code, out=out, err=err)

    return run


@pytest.fixture
def mixed(app: TaskPG, run_worker: Any) -> SimpleNamespace:
    """Dead jobs of two tasks (one in queue 'other'), a succeeded job and an available one."""

    @app.task(name="cli.boom")
    def boom(n: int) -> None:
        raise ValueError(f"boom {n}")

    @app.task(name="cli.bust")
    def bust(n: int) -> None:
        raise ValueError(f"bust {n}")

    @app.task(name="cli.ok")
    def ok(n: int) -> int:
        return n

    handles = [boom.delay(0), boom.apply_async((1,), queue="other"), bust.delay(2), ok.delay(3)]
    with run_worker(app, queues=["default", "other"]):
        for handle in handles:
            handle.get(timeout=15, propagate=False)
    waiting = ok.delay(4)  # no worker runs any more: stays available
    return SimpleNamespace(
        boom=[handles[0].id, handles[1].id],
        bust=handles[2].id,
        dead=[handles[0].id, handles[1].id, handles[2].id],
        succeeded=handles[3].id,
        available=waiting.id,
    )


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
