"""The workloads of issue 7 (W1-W5), each a list of cases: the raw baseline and taskpg's variants.
(W6 and W7 are in ``steady``, which reuses the helpers below.)

Sizes are the issue's multiplied by ``--scale`` (see :meth:`Bench.size`). Every measure function
gets a freshly migrated schema, runs once and checks the outcome in the database before returning.
"""

from __future__ import annotations

import functools
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from taskpg import signals
from taskpg.flusher import Flusher
from taskpg.sql import CLAIM_SESSION, Queries
from taskpg.worker import Worker

from . import baseline
from .pg import (
    BenchmarkError,
    connect,
    expect_count,
    latencies_ms,
    render,
    seed_backlog,
    seed_ready,
    wait_drained,
)
from .runner import Bench, Case, Measurement
from .tasks import ASYNC_NOOP, NOOP, make_app
from .workers import POLL_ONLY_SUPPORTED, InProcessWorker, PollOnlyWorker, WorkerProcesses

if TYPE_CHECKING:
    from collections.abc import Callable

    from taskpg import TaskPG

#: Job counts the issue asks for (``--scale 1``).
ISSUE_SIZES = {
    **{"W1": 1_000_000, "W1b": 1_000_000, "W2": 10_000, "W3": 200_000, "W3b": 200_000, "W4": 1_000},
    "W5": 1_000_000,  # ready jobs, plus as many scheduled and as many finished rows
    "W6": 1_000_000,  # enqueued at a steady 5k jobs/s (benchmarks/steady.py)
    "W7": 40_000,  # single .delay() calls from 8 client processes (the issue sets no count)
}
#: Latency workloads keep enough samples for a p99 when scaled down, W7 a few seconds (not in --smoke).
FLOORS = {"W2": 2_000, "W4": 300, "W7": 4_000}
W1_BATCHES = (1_000, 10_000, 100_000)
PUSH_BATCH = 10_000  # W1b: envelopes per delay_many(via="buffer") call
FLUSH_BATCH = 50_000  # W1b: the flusher's default batch size (its raw baseline COPYs as many per transaction)
RAW_DRAIN = {"connections": 2, "batch": 200}  # the batched raw ceiling: one connection per core
W4_INTERVAL = 0.010  # seconds between enqueues
W4_CONCURRENCY = 8
DRAIN_CONCURRENCY = 8  # W3b and W5 run the issue's reference setting, -c 8
CLAIM_PARAMS = {"queues": ["default"], "limit": 16, "worker_id": "bench-explain", "fetch_limit": 2_000_000}


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    cases: Callable[[Bench], list[Case]]
    needs_redis: bool = False


def _case(
    case_id: str,
    variant: str,
    jobs: int,
    measure: Callable[..., Measurement],
    *,
    concurrency: int | None = None,
    batch: int | None = None,
    baseline: str | None = None,
    latency: bool = False,
    once: bool = False,
    **options: Any,
) -> Case:
    """A case whose measure function gets ``options`` as keyword arguments."""
    workload = case_id.split("/")[0]
    return Case(
        case_id,
        workload,
        variant,
        jobs,
        functools.partial(measure, **options),
        concurrency,
        batch,
        baseline,
        latency,
        once,
    )


def _app(bench: Bench, schema: str, redis: bool = False, **options: Any) -> TaskPG:
    """An app on the run's schema, its schema check and first pooled connection done (not timed)."""
    app = make_app(bench.dsn, schema, bench.redis_url if redis else None, **options)
    app.store.check_schema()
    with app.store.connections.pooled():
        pass
    return app


def _channel(schema: str) -> str:
    return Queries(schema).jobs_channel


def _drain_timeout(n: int) -> float:
    """Fail a drain slower than ~500 jobs/s instead of waiting for ever (a collapsed worker)."""
    return 60.0 + n / 500


# -- W1: bulk enqueue --------------------------------------------------------------------------


def w1_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W1"])
    cases = []
    for batch in W1_BATCHES:
        raw = f"W1/raw/b{batch}"
        cases.append(_case(raw, "raw COPY", n, _w1_raw, n=n, per_tx=batch, batch=batch))
        cases.append(
            _case(f"W1/taskpg/b{batch}", "delay_many", n, _w1_taskpg, n=n, per_tx=batch, batch=batch, baseline=raw)
        )
    return cases


def _w1_raw(bench: Bench, schema: str, n: int, per_tx: int) -> Measurement:
    seconds = baseline.copy_enqueue(bench.dsn, schema, n, per_tx, NOOP, _channel(schema))
    expect_count(bench.dsn, schema, "available", n)
    return Measurement(n, seconds)


def _w1_taskpg(bench: Bench, schema: str, n: int, per_tx: int) -> Measurement:
    app = _app(bench, schema)
    try:
        task = app.tasks[NOOP]
        calls = [(i,) for i in range(n)]
        started = time.perf_counter()
        for start in range(0, n, per_tx):
            task.delay_many(calls[start : start + per_tx])
        seconds = time.perf_counter() - started
    finally:
        app.close()
    expect_count(bench.dsn, schema, "available", n)
    return Measurement(n, seconds)


# -- W1b: the Redis buffer ---------------------------------------------------------------------


def w1b_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W1b"])
    raw = "W1b/raw"
    return [
        _case(raw, "raw COPY", n, _w1_raw, n=n, per_tx=FLUSH_BATCH, batch=FLUSH_BATCH),
        _case("W1b/taskpg", "buffer: Flusher.drain", n, _w1b_buffer, n=n, batch=FLUSH_BATCH, baseline=raw),
    ]


def _w1b_buffer(bench: Bench, schema: str, n: int) -> Measurement:
    """RPUSH ``n`` envelopes (delay_many via the buffer), then time the flusher moving them all."""
    app = _app(bench, schema, redis=True)
    try:
        task = app.tasks[NOOP]
        calls = [(i,) for i in range(n)]
        started = time.perf_counter()
        ids: list[str | None] = []
        for start in range(0, n, PUSH_BATCH):
            ids += task.delay_many(calls[start : start + PUSH_BATCH], via="buffer")
        pushed = time.perf_counter() - started
        started = time.perf_counter()
        Flusher(app).drain()
        seconds = time.perf_counter() - started
        left_in_redis = app.buffer.depth()[0]
    finally:
        app.close()
        _clear_redis(bench.redis_url, schema)
    found, total = _found_and_total(bench.dsn, schema, [i for i in ids if i is not None])
    extra = {"push_jobs_per_s": round(n / pushed), "lost": n - found, "duplicated": total - found}
    if left_in_redis:
        raise BenchmarkError(f"{left_in_redis} envelope(s) still in Redis after the drain")
    return Measurement(found, seconds, extra=extra)


def _found_and_total(dsn: str, schema: str, ids: list[str]) -> tuple[int, int]:
    """How many of these job ids the table holds, and how many rows it holds in all."""
    statement = render("SELECT count(*) FILTER (WHERE id = ANY(%s::uuid[])), count(*) FROM {jobs}", schema)
    with connect(dsn) as conn:
        row = conn.execute(statement, [ids]).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _clear_redis(url: str | None, schema: str) -> None:
    if url is None:
        return
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"taskpg:{schema}:*"))
    if keys:
        client.delete(*keys)
    client.close()


# -- W2: one .delay() at a time ------------------------------------------------------------------


def w2_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W2"], FLOORS["W2"])
    cases = []
    for in_tx, label in ((False, "autocommit"), (True, "in caller's transaction")):
        raw = f"W2/raw/{'tx' if in_tx else 'auto'}"
        cases.append(_case(raw, f"raw INSERT, {label}", n, _w2_raw, n=n, in_tx=in_tx, latency=True))
        name = "apply_async(connection=)" if in_tx else "delay()"
        mine = f"W2/taskpg/{'tx' if in_tx else 'auto'}"
        cases.append(_case(mine, f"{name}, {label}", n, _w2_taskpg, n=n, in_tx=in_tx, baseline=raw, latency=True))
    return cases


def _w2_raw(bench: Bench, schema: str, n: int, in_tx: bool) -> Measurement:
    started = time.perf_counter()
    timings = baseline.insert_latencies(bench.dsn, schema, n, NOOP, _channel(schema), in_tx)
    seconds = time.perf_counter() - started
    expect_count(bench.dsn, schema, "available", n)
    return Measurement(n, seconds, [t * 1000 for t in timings])


def _w2_taskpg(bench: Bench, schema: str, n: int, in_tx: bool) -> Measurement:
    """Time each enqueue call; in a transaction, the caller's BEGIN work and COMMIT are not timed."""
    app = _app(bench, schema)
    timings = []
    try:
        task = app.tasks[NOOP]
        started = time.perf_counter()
        if in_tx:
            with psycopg.connect(bench.dsn) as conn:
                for i in range(n):
                    conn.execute("SELECT 1")  # the caller's own work opens its transaction
                    began = time.perf_counter()
                    task.apply_async((i,), connection=conn)
                    timings.append(time.perf_counter() - began)
                    conn.commit()
        else:
            for i in range(n):
                began = time.perf_counter()
                task.delay(i)
                timings.append(time.perf_counter() - began)
        seconds = time.perf_counter() - started
    finally:
        app.close()
    expect_count(bench.dsn, schema, "available", n)
    return Measurement(n, seconds, [t * 1000 for t in timings])


# -- W3 / W3b: draining ready jobs -------------------------------------------------------------


def _raw_drain_case(case_id: str, n: int, backlog: int = 0) -> Case:
    return _case(
        case_id,
        f"raw claim+finish, {RAW_DRAIN['connections']} connections",
        n,
        _drain_raw,
        n=n,
        backlog=backlog,
        concurrency=RAW_DRAIN["connections"],
        batch=RAW_DRAIN["batch"],
    )


#: A deeper claim buffer for the tuned W3 variant (``taskpg worker --prefetch``): bigger claims and
#: finishes cost less per job, which is what no-op jobs are bound by.
TUNED_PREFETCH = 256


def w3_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W3"])
    raw = "W3/raw"
    cases = [_raw_drain_case(raw, n)]
    for c in (1, 8, 64):
        cases.append(
            _case(
                f"W3/threads/c{c}",
                "taskpg threads pool",
                n,
                _drain_in_process,
                n=n,
                c=c,
                pool="threads",
                task=NOOP,
                concurrency=c,
                baseline=raw,
            )
        )
    cases.append(
        _case(
            f"W3/threads/c8/prefetch{TUNED_PREFETCH}",
            f"taskpg threads pool, prefetch {TUNED_PREFETCH} (tuned for tiny jobs)",
            n,
            _drain_in_process,
            n=n,
            c=8,
            pool="threads",
            task=NOOP,
            prefetch=TUNED_PREFETCH,
            concurrency=8,
            baseline=raw,
        )
    )
    cases.append(
        _case(
            "W3/threads/c8/hooked",
            "taskpg threads pool, a no-op receiver on each hot signal and a pass-through middleware",
            n,
            _drain_in_process,
            n=n,
            c=8,
            pool="threads",
            task=NOOP,
            hooked=True,
            concurrency=8,
            baseline=raw,
        )
    )
    cases.append(
        _case(
            "W3/async/c8",
            "taskpg async pool (async def task)",
            n,
            _drain_in_process,
            n=n,
            c=8,
            pool="async",
            task=ASYNC_NOOP,
            concurrency=8,
            baseline=raw,
        )
    )
    return cases


def _pass_through(call_next: Callable[[Any], Any], request: Any) -> Any:
    return call_next(request)


def _ignore(**kwargs: Any) -> None:
    return None


def _drain_raw(bench: Bench, schema: str, n: int, backlog: int) -> Measurement:
    if backlog:
        seed_backlog(bench.dsn, schema, backlog, backlog, NOOP)
    started = seed_ready(bench.dsn, schema, n, NOOP, _channel(schema))
    baseline.drain(bench.dsn, schema, RAW_DRAIN["connections"], RAW_DRAIN["batch"])
    seconds = time.perf_counter() - started
    expect_count(bench.dsn, schema, "succeeded", n + backlog)
    return Measurement(n, seconds)


def _drain_in_process(
    bench: Bench,
    schema: str,
    n: int,
    c: int,
    pool: str,
    task: str,
    prefetch: int | None = None,
    hooked: bool = False,
) -> Measurement:
    """An idle in-process worker; the clock starts at the commit that makes ``n`` jobs ready. ``hooked``:
    with a no-op receiver on each signal sent per job and a middleware that only calls on."""
    app = _app(bench, schema, middleware=[_pass_through] if hooked else [])
    hot = (signals.task_prerun, signals.task_postrun, signals.task_success) if hooked else ()
    for sig in hot:
        sig.connect(_ignore)
    try:
        with InProcessWorker(app, concurrency=c, pool=pool, prefetch=prefetch):
            started = seed_ready(bench.dsn, schema, n, task, _channel(schema))
            finished = wait_drained(bench.dsn, schema, _drain_timeout(n))
    finally:
        for sig in hot:
            sig.disconnect(_ignore)
        app.close()
    expect_count(bench.dsn, schema, "succeeded", n)
    return Measurement(n, finished - started)


def w3b_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W3b"])
    raw = "W3b/raw"
    c = DRAIN_CONCURRENCY
    return [_raw_drain_case(raw, n)] + [
        _case(
            f"W3b/p{p}",
            f"taskpg {p} worker process{'es' if p > 1 else ''} x -c {c}",
            n,
            _drain_processes,
            n=n,
            processes=p,
            c=c,
            concurrency=c,
            baseline=raw,
        )
        for p in (1, 2)
    ]


def _drain_processes(bench: Bench, schema: str, n: int, processes: int, c: int) -> Measurement:
    """``taskpg worker`` processes, registered and idle; the clock starts at the commit."""
    with WorkerProcesses(bench.dsn, schema, processes, c):
        started = seed_ready(bench.dsn, schema, n, NOOP, _channel(schema))
        finished = wait_drained(bench.dsn, schema, _drain_timeout(n))
    expect_count(bench.dsn, schema, "succeeded", n)
    return Measurement(n, finished - started)


# -- W4: enqueue -> start latency ---------------------------------------------------------------


def w4_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W4"], FLOORS["W4"])
    raw = "W4/raw"
    c = W4_CONCURRENCY
    cases = [
        _case(raw, "raw LISTEN consumer", n, _w4_raw, n=n, latency=True),
        _case(
            "W4/notify",
            "taskpg LISTEN/NOTIFY",
            n,
            _w4_taskpg,
            n=n,
            worker_class=Worker,
            poll=2.0,
            concurrency=c,
            baseline=raw,
            latency=True,
        ),
    ]
    if POLL_ONLY_SUPPORTED:
        for poll in (2.0, 0.25):
            cases.append(
                _case(
                    f"W4/poll{poll:g}",
                    f"taskpg poll-only, poll_interval {poll:g} s",
                    n,
                    _w4_taskpg,
                    n=n,
                    worker_class=PollOnlyWorker,
                    poll=poll,
                    concurrency=c,
                    latency=True,
                )
            )
    return cases


def _spaced(enqueue: Callable[[int], Any], n: int, interval: float) -> None:
    start = time.perf_counter()
    for i in range(n):
        pause = start + i * interval - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        enqueue(i)


def _w4_raw(bench: Bench, schema: str, n: int) -> Measurement:
    started = time.perf_counter()
    with baseline.ListeningConsumer(bench.dsn, schema, _channel(schema)):
        baseline.produce_spaced(bench.dsn, schema, n, W4_INTERVAL, NOOP, _channel(schema))
        wait_drained(bench.dsn, schema, _drain_timeout(n))
    seconds = time.perf_counter() - started
    expect_count(bench.dsn, schema, "succeeded", n)
    return Measurement(n, seconds, latencies_ms(bench.dsn, schema))


def _w4_taskpg(bench: Bench, schema: str, n: int, worker_class: type[Worker], poll: float) -> Measurement:
    """An idle worker; one ``delay()`` every 10 ms; latency = started_at - created_at of each job."""
    app = _app(bench, schema)
    try:
        task = app.tasks[NOOP]
        with InProcessWorker(app, worker_class, concurrency=W4_CONCURRENCY, poll_interval=poll):
            started = time.perf_counter()
            _spaced(task.delay, n, W4_INTERVAL)
            wait_drained(bench.dsn, schema, _drain_timeout(n))
            seconds = time.perf_counter() - started
    finally:
        app.close()
    expect_count(bench.dsn, schema, "succeeded", n)
    return Measurement(n, seconds, latencies_ms(bench.dsn, schema))


# -- W5: drain with a backlog ------------------------------------------------------------------


def w5_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W5"])
    raw = "W5/raw"
    return [
        _raw_drain_case(raw, n, backlog=n),
        _case(
            "W5/threads/c8",
            "taskpg threads pool + backlog",
            n,
            _w5_taskpg,
            n=n,
            concurrency=DRAIN_CONCURRENCY,
            baseline=raw,
        ),
    ]


def _w5_taskpg(bench: Bench, schema: str, n: int) -> Measurement:
    """``n`` scheduled + ``n`` finished rows in the way, then the W3 drain of ``n`` ready jobs at -c 8.

    Afterwards (not timed) ``n`` ready jobs again, ANALYZE, and the plans of the claim and finish
    statements. ANALYZE comes after the drain on purpose: see :func:`statement_plans`.
    """
    seed_backlog(bench.dsn, schema, n, n, NOOP)
    app = _app(bench, schema)
    try:
        with InProcessWorker(app, concurrency=DRAIN_CONCURRENCY):
            started = seed_ready(bench.dsn, schema, n, NOOP, _channel(schema))
            finished = wait_drained(bench.dsn, schema, _drain_timeout(n))
    finally:
        app.close()
    expect_count(bench.dsn, schema, "succeeded", 2 * n)
    with connect(bench.dsn) as conn:  # no statistics, the ready set drained: how the last claims ran
        conn.execute(CLAIM_SESSION)  # as on the worker's claim connection
        drained = _plan(conn, "EXPLAIN " + Queries(schema).claim_jobs, CLAIM_PARAMS)
    seed_ready(bench.dsn, schema, n, NOOP, "bench_nobody_listens")
    return Measurement(
        n, finished - started, extra={"claim_no_stats_drained": drained, **statement_plans(bench.dsn, schema)}
    )


def statement_plans(dsn: str, schema: str) -> dict[str, str]:
    """The indexes taskpg's claim and finish statements use once the table has statistics, and the
    claim's generic plan (what a prepared statement may switch to); "seq scan" when a plan reads the
    whole jobs table.

    Statistics taken while no job is running make the planner believe 'running' rows are rare, and
    the finish statement is then driven from ``jobs_running_idx`` instead of the primary key: a
    worker under load slows down as its running set grows (docs/performance.md, W5).
    """
    q = Queries(schema)
    ids = [str(uuid.uuid4()) for _ in range(16)]
    finish = {"outcomes": json.dumps([{"id": i, "lease": i, "state": "succeeded"} for i in ids])}
    generic = (
        q.claim_jobs.replace("%(queues)s", "$1")
        .replace("%(limit)s", "$2")
        .replace("%(worker_id)s", "$3")
        .replace("%(fetch_limit)s", "$4")
    )
    with connect(dsn) as conn:
        conn.execute(render("ANALYZE {jobs}", schema))
        plans = {"claim": _plan(conn, "EXPLAIN " + q.claim_jobs, CLAIM_PARAMS)}
        plans["finish"] = _plan(conn, "EXPLAIN " + q.finish_jobs, finish)
        try:
            conn.execute("PREPARE bench_claim(text[], int, text, int) AS " + generic)
            conn.execute("SET plan_cache_mode = force_generic_plan")
        except psycopg.Error as exc:
            plans["claim_generic"] = f"error: {exc}"
        else:
            plans["claim_generic"] = _plan(
                conn, "EXPLAIN EXECUTE bench_claim('{default}', 16, 'bench-explain', 2000000)"
            )
    return plans


def _plan(conn: psycopg.Connection[Any], statement: str, params: Any = None) -> str:
    """The indexes a plan scans on the jobs table: "(bitmap)" marks a bitmap scan, which reads and
    sorts every matching row instead of stopping at LIMIT; "+ seq scan" a read of the whole table."""
    try:
        text = "\n".join(str(row[0]) for row in conn.execute(statement, params).fetchall())
    except psycopg.Error as exc:  # the statement changed shape: say so rather than fail the run
        return f"error: {str(exc).splitlines()[0]}"
    indexes = sorted(set(re.findall(r"Index (?:Only )?Scan (?:Backward )?using (\w+) on jobs", text)))
    indexes += sorted({f"{name} (bitmap)" for name in re.findall(r"Bitmap Index Scan on (\w+)", text)})
    return " + ".join(indexes or ["no index"]) + (" + seq scan" if "Seq Scan on jobs" in text else "")


WORKLOADS = [
    Workload("W1", "bulk enqueue: delay_many (COPY) in batches vs raw COPY", w1_cases),
    Workload("W1b", "Redis buffer: RPUSHed envelopes flushed into Postgres", w1b_cases, needs_redis=True),
    Workload("W2", "single .delay() latency on one connection", w2_cases),
    Workload("W3", "no-op drain of ready jobs, one in-process worker", w3_cases),
    Workload("W3b", "no-op drain with 1 vs 2 worker processes", w3b_cases),
    Workload("W4", "enqueue -> start latency, idle worker, jobs 10 ms apart", w4_cases),
    Workload("W5", "drain with a backlog of scheduled + finished rows, EXPLAIN check", w5_cases),
]
