"""A rate limit per tenant: 60 jobs call an API that allows each tenant 5 calls per second.

Run it against a Postgres you can write to:

    python examples/rate_limited_api.py

Configuration comes from the environment: ``TASKPG_DSN`` (default ``postgresql://postgres@127.0.0.1:5432/test``),
``TASKPG_SCHEMA`` (default ``taskpg_ratelimit``) and, optionally, ``TASKPG_REDIS_URL``. With a Redis URL the
rate limiter keeps its windows in Redis sorted sets; without one it keeps them in a Postgres table. The limit
holds either way:

    TASKPG_REDIS_URL=redis://127.0.0.1:6379/0 python examples/rate_limited_api.py

The program migrates the schema and deletes the jobs an earlier run of this example left behind. It enqueues 20
calls for each of three tenants, all at once, and runs a ``Worker`` with 8 threads until every job has succeeded.
The worker could start all 60 at once. The task's ``rate_limit="5/s", rate_limit_key="{tenant}"`` lets at most 5
jobs per tenant start in any second, across all workers; a job over the limit goes back to the queue until its
slot comes, without spending an attempt. Last, the program prints, per tenant, how many calls the API received and
the most it received in any 1-second window (at most 5), and how long the whole run took: about 4 s, because each
tenant's 20 calls need four windows, and a job put back waits for its slot and then for the worker to pick it up.

The API is not real: ``FakeQuotaAPI`` is an in-process stand-in that only records when each tenant called it.
In a real deployment the task would make an HTTP request, and you would run ``taskpg worker -A
examples.rate_limited_api`` on as many machines as you like: the limit is shared by all of them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

import psycopg
from psycopg import sql

from taskpg import TaskPG, Worker

DSN = os.environ.get("TASKPG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = os.environ.get("TASKPG_SCHEMA", "taskpg_ratelimit")
REDIS_URL = os.environ.get("TASKPG_REDIS_URL") or None

TENANTS = ("acme", "globex", "initech")
CALLS_PER_TENANT = 20
QUOTA_PER_SECOND = 5


class FakeQuotaAPI:
    """A STAND-IN for an external HTTP API with a per-tenant quota of calls per second.

    It makes no request: it records the time of each call, per tenant, so the program can check afterwards
    that no tenant went over the quota. Thread-safe, because the worker calls it from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, list[float]] = defaultdict(list)

    def call(self, tenant: str, n: int) -> dict[str, object]:
        with self._lock:
            self._calls[tenant].append(time.monotonic())
        return {"tenant": tenant, "n": n, "status": 200}

    def calls(self, tenant: str) -> list[float]:
        with self._lock:
            return sorted(self._calls[tenant])

    def busiest_window(self, tenant: str, seconds: float = 1.0) -> int:
        """The most calls of ``tenant`` that fall within any window of ``seconds`` (start included, end not)."""
        times = self.calls(tenant)
        return max((sum(1 for t in times if start <= t < start + seconds) for start in times), default=0)


api = FakeQuotaAPI()
app = TaskPG(DSN, schema=SCHEMA, redis_url=REDIS_URL)


@app.task(name="examples.call_api", rate_limit=f"{QUOTA_PER_SECOND}/s", rate_limit_key="{tenant}")
def call_api(tenant: str, n: int) -> dict[str, object]:
    """One call to the API on behalf of ``tenant``; each tenant has its own rate-limit window."""
    return api.call(tenant, n)


def forget_earlier_runs() -> None:
    """Delete this example's jobs from an earlier run, so only this run's calls reach the API."""
    with psycopg.connect(app.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE task = %s").format(sql.Identifier(app.schema, "jobs")), (call_api.name,)
        )


def main() -> None:
    app.migrate()  # same as `taskpg migrate`
    forget_earlier_runs()
    limiter = "Redis" if app.redis_url else "Postgres"
    print(f"rate limit: {QUOTA_PER_SECOND} calls per second per tenant ({limiter} limiter)")

    started = time.monotonic()
    calls = [(tenant, n) for n in range(CALLS_PER_TENANT) for tenant in TENANTS]
    ids = call_api.delay_many(calls)  # one COPY for all 60 jobs
    with Worker(app, queues=["default"], concurrency=8, grace=5).in_background():
        for job_id in ids:
            assert job_id is not None  # None only marks a call a throttle dropped; this task has no throttle
            app.AsyncResult(job_id).get(timeout=120)
    app.close()
    elapsed = time.monotonic() - started

    for tenant in TENANTS:
        print(f"{tenant}: {len(api.calls(tenant))} calls, at most {api.busiest_window(tenant)} in any 1 s window")
    print(f"total: {len(calls)} calls in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
