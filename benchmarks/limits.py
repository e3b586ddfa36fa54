"""W9: rate limits. Does a limit deliver what it allows, never more, and what does it cost Postgres?

Each case runs 4 ``taskpg worker`` processes (-c 8) on a backlog of a rate-limited task, as many jobs
as the limit allows in the run (60 s by default), all enqueued before the workers start. The body
returns ``time.time()``, so every start is read back from the job's result. Reported: the starts per
second from the first to the last against the limit, the most starts in any one period (must not
exceed the limit), and the row updates per job on the jobs table (2 is the floor: claim and finish;
5 for a job put back once until its reserved start: claim, put back, promote, claim, finish; the
sliding-window limiter of 0.x made about 60 at 20/s, a claim and a put-back per look).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from taskpg.rates import parse_rate

from .pg import BenchmarkError, connect, render
from .runner import Bench, Case, Measurement
from .tasks import RATE_LIMITED, make_app
from .workers import WorkerProcesses
from .workloads import Workload, _case

if TYPE_CHECKING:
    from collections.abc import Sequence

    from taskpg.rates import Rate

W9_WORKERS = 4
W9_CONCURRENCY = 8
W9_SECONDS_AT_SCALE_1 = 600.0  # 60 s at the default --scale 0.1: the "over 60 s"
W9_SMOKE_SECONDS = 3.0
DRAIN_SLACK = 1.5  # the run fails if the jobs are not done in 1.5x the time the limit needs (+ 30 s)
DELIVERED_TARGET = 0.95  # "the limit delivered to within 5 %"

#: (case, task, limiter backend)
W9_VARIANTS = (
    ("W9/postgres/20ps", "benchmarks.rate_20_per_s", "postgres"),
    ("W9/redis/20ps", "benchmarks.rate_20_per_s", "redis"),
    ("W9/postgres/20000pm", "benchmarks.rate_20000_per_m", "postgres"),
)


def _seconds(bench: Bench) -> float:
    return W9_SMOKE_SECONDS if bench.smoke else max(10.0, W9_SECONDS_AT_SCALE_1 * bench.scale)


def w9_cases(bench: Bench) -> list[Case]:
    seconds = _seconds(bench)
    cases = []
    for case_id, task, backend in W9_VARIANTS:
        rate = parse_rate(RATE_LIMITED[task])
        if backend == "redis" and bench.redis_url is None:
            continue
        jobs = _jobs(rate, seconds)
        variant = f"{RATE_LIMITED[task]} for {seconds:g} s, {backend} limiter"
        cases.append(
            _case(case_id, variant, jobs, _w9, concurrency=W9_CONCURRENCY, once=True, task=task, backend=backend)
        )
    return cases


def _jobs(rate: Rate, seconds: float) -> int:
    """As many jobs as the limit starts in ``seconds`` (the first at once)."""
    return round(rate.count / rate.seconds * seconds) + 1


def _wait_succeeded(dsn: str, schema: str, jobs: int, timeout: float) -> None:
    """Until ``jobs`` jobs succeeded (the others wait in 'scheduled' for their starts meanwhile)."""
    done = render("SELECT count(*) FROM {jobs} WHERE state = 'succeeded'", schema)
    deadline = time.monotonic() + timeout
    with connect(dsn) as conn:
        while (row := conn.execute(done).fetchone()) is None or row[0] < jobs:
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{row[0] if row else 0} of {jobs} jobs succeeded in {timeout:.0f} s")
            time.sleep(0.2)


def most_in_a_period(starts: Sequence[float], period: float) -> int:
    """The most starts inside any window ``period`` seconds long (half-open)."""
    best, left = 0, 0
    for right, moment in enumerate(starts):
        while moment - starts[left] >= period:
            left += 1
        best = max(best, right - left + 1)
    return best


def _w9(bench: Bench, schema: str, task: str, backend: str) -> Measurement:
    rate = parse_rate(RATE_LIMITED[task])
    seconds = _seconds(bench)
    redis_url = bench.redis_url if backend == "redis" else None
    app = make_app(bench.dsn, schema, redis_url)
    jobs = _jobs(rate, seconds)
    app.tasks[task].delay_many([()] * jobs)
    app.close()
    with WorkerProcesses(bench.dsn, schema, W9_WORKERS, W9_CONCURRENCY, redis_url=redis_url):
        _wait_succeeded(bench.dsn, schema, jobs, seconds * DRAIN_SLACK + 30)
    with connect(bench.dsn) as conn:
        starts_of = render("SELECT (result #>> '{{}}')::float8 FROM {jobs} WHERE state = 'succeeded'", schema)
        starts = sorted(row[0] for row in conn.execute(starts_of).fetchall())
        conn.execute("SELECT pg_stat_clear_snapshot()")  # the workers exited: their counters are flushed
        row = conn.execute(
            "SELECT n_tup_upd FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'", (schema,)
        ).fetchone()
    if len(starts) != jobs:
        raise BenchmarkError(f"{len(starts)} of {jobs} jobs succeeded")
    updates = row[0] if row else 0
    limit_per_s = rate.count / rate.seconds
    took = starts[-1] - starts[0]
    delivered = (len(starts) - 1) / took
    most = most_in_a_period(starts, rate.seconds)
    extra = {
        "limit_per_s": round(limit_per_s, 2),
        "delivered_per_s": round(delivered, 2),
        "delivered_vs_limit": round(delivered / limit_per_s, 4),
        "limit_per_period": rate.count,
        "most_in_a_period": most,
        "updates_per_job": round(updates / jobs, 2),
    }
    share = delivered / limit_per_s
    note = f"{share:.1%} of the limit, most {most}/{rate.count}, {extra['updates_per_job']} updates/job"
    return Measurement(jobs, took, extra=extra, note=note)


LIMIT_WORKLOADS = [
    Workload("W9", "rate limits over a run: delivered vs the limit, never over it, row updates per start", w9_cases),
]
