"""Testing helpers, and a pytest plugin (registered as ``taskpg`` when taskpg is installed).

``drain(app)`` runs the jobs that are due with the **real** executor, inline in the caller, until none is left
(Oban's ``drain_queue``): the same argument checks, retries, dead letters, canvas steps and signals as a worker,
without a worker process or a thread to wait for. The fixtures give each test a fresh, migrated schema:

- ``taskpg_dsn``: ``TASKPG_TEST_DSN``, else ``TASKPG_DSN``/``DATABASE_URL``, else an embedded Postgres.
- ``taskpg_schema``: a new schema ``taskpg_test_<hex>``, migrated, dropped after the test.
- ``taskpg_app``: a ``TaskPG`` on that schema, closed after the test; register the tasks under test on it, or point
  your own app at ``taskpg_schema`` with ``app.configure(dsn=taskpg_dsn, schema=taskpg_schema)`` before first use.
"""

from __future__ import annotations

import asyncio
import collections
import os
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from . import embedded, migrate
from .app import TaskPG
from .completer import write_outcomes
from .dsn import configured_dsn
from .executor import Executor
from .job import Outcome

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

#: The worker id that drained jobs carry (on their rows, while they run).
DRAIN_WORKER = "taskpg-drain"
#: Schemas the fixtures make start with this (and only those are dropped).
TEST_SCHEMA_PREFIX = "taskpg_test_"
#: Jobs claimed per round of ``drain``.
ROUND = 100


def drain(
    app: TaskPG, queues: Sequence[str] | None = None, *, with_scheduled: bool = False, max_jobs: int = 100_000
) -> dict[str, int]:
    """Run the due jobs of ``queues`` (default: every queue of the app's tasks) with the real executor, inline,
    until none is left; returns how many attempts ended in each state (``succeeded``, ``dead``, ``scheduled``
    for a retry that waits, ...). ``with_scheduled`` also runs jobs whose time has not come (retries, countdowns)
    at once. Jobs enqueued by the jobs drained (canvas steps, callbacks) are run too."""
    served = list(queues) if queues is not None else sorted({t.options.queue for t in app.tasks.values()})
    executor = Executor(app.tasks, DRAIN_WORKER, app.max_payload_bytes)
    counts: collections.Counter[str] = collections.Counter()
    ran = 0
    while ran < max_jobs:
        if with_scheduled:
            app.store.make_due(served)
        else:
            app.store.promote_due()
        jobs = app.store.claim(served, ROUND, DRAIN_WORKER, app.max_payload_bytes)
        if not jobs:
            if not _claimable(app, served):  # a claim that only cancelled expired jobs leaves the rest due
                break
            continue
        outcomes = [_run(executor, job) for job in jobs]
        write_outcomes(app.store, outcomes, app.tasks)
        counts.update(outcome.state.value for outcome in outcomes)
        ran += len(jobs)
    return dict(counts)


def _claimable(app: TaskPG, queues: Sequence[str]) -> bool:
    """Whether a queue of these that is not paused still has an available job."""
    counts, paused = app.store.job_counts(), set(app.store.paused_queues())
    return any(counts.get(queue, {}).get("available") for queue in queues if queue not in paused)


def _run(executor: Executor, job: Any) -> Outcome:
    call = executor.prepare(job)
    if isinstance(call, Outcome):
        return call
    if executor.is_async(call):
        return asyncio.run(executor.run_async(call))
    return executor.tell(call, executor.attempt_sync(call))


# -- the pytest plugin -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def taskpg_dsn() -> str:
    """Where the tests' schemas go: TASKPG_TEST_DSN, TASKPG_DSN or DATABASE_URL, else the embedded Postgres
    (of TASKPG_DATA_DIR, default ./.taskpg). Override this fixture in your conftest to choose another."""
    given = os.environ.get("TASKPG_TEST_DSN") or configured_dsn()
    return given or embedded.start()


@pytest.fixture
def taskpg_schema(taskpg_dsn: str) -> Iterator[str]:
    """A fresh schema with taskpg's tables, dropped after the test."""
    schema = f"{TEST_SCHEMA_PREFIX}{uuid.uuid4().hex[:12]}"
    migrate.upgrade(taskpg_dsn, schema)
    try:
        yield schema
    finally:
        scratch = TaskPG(taskpg_dsn, schema=schema)
        try:
            scratch.store.drop_test_schema(TEST_SCHEMA_PREFIX)
        finally:
            scratch.close()


@pytest.fixture
def taskpg_app(taskpg_dsn: str, taskpg_schema: str) -> Iterator[TaskPG]:
    """A TaskPG on a fresh schema; ``drain(taskpg_app)`` runs its jobs."""
    app = TaskPG(taskpg_dsn, schema=taskpg_schema)
    try:
        yield app
    finally:
        app.close()
