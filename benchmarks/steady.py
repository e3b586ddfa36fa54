"""W6 (bloat under a steady load, and a long transaction) and W7 (enqueue from 8 clients,
NOTIFY per transaction vs debounced), with the raw-SQL cycles they are compared with.

Producers and clients run as processes forked from a forkserver that has already imported this
module, so they start in milliseconds and never share the GIL with the worker under test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import multiprocessing
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from taskpg import TaskPG
from taskpg.beat import Beat

from . import baseline
from .background import BackgroundLoop
from .pg import BenchmarkError, connect, expect_count, render, state_counts, wait_drained
from .runner import Bench, Case, Measurement
from .tasks import NOOP
from .workers import START_TIMEOUT, InProcessWorker
from .workloads import (
    DRAIN_CONCURRENCY,
    FLOORS,
    ISSUE_SIZES,
    RAW_DRAIN,
    Workload,
    _app,
    _case,
    _channel,
    _drain_timeout,
    _spaced,
)

if TYPE_CHECKING:
    import datetime as dt
    from types import TracebackType

#: Children fork from a server that imported this module once (and nothing of the parent's threads).
_PROCESSES = multiprocessing.get_context("forkserver")
_PROCESSES.set_forkserver_preload([__name__])

# -- W6 settings ---------------------------------------------------------------------------------

STEADY_RATE = 5_000  # jobs/s, the issue's steady load
STEADY_BATCH = 50  # jobs per delay_many / raw COPY transaction...
STEADY_INTERVAL = STEADY_BATCH / STEADY_RATE  # ...one every 10 ms
BLOAT_TARGET = 5.0  # heap + indexes <= 5x the live data
#: The pruned variant: finished jobs kept this long, pruned this often (beat's job, with a short retention).
PRUNE_KEEP = 5.0
PRUNE_EVERY = 1.0
#: The long-transaction variant runs the chore (it vacuums) but keeps every job, to count them afterwards.
KEEP_ALL = 24 * 3600.0
#: The long-transaction run lasts LONG_TX_LOAD x the steady run (25 s at the default scale): a
#: snapshot is taken after LONG_TX_BEFORE of it (5 s) and held for LONG_TX_HOLD (10 s); the rest is "after".
LONG_TX_LOAD = 1.25
LONG_TX_BEFORE = 0.2
LONG_TX_HOLD = 0.4
RECOVERED = 0.9  # "recovered": after-window throughput >= 90% of the before-window's

# -- W7 settings ---------------------------------------------------------------------------------

W7_CLIENTS = 8
NOTIFY_DEBOUNCE = 0.005  # seconds: TaskPG(notify_debounce=...) for the debounced variant
DEBOUNCE_TARGET = 1.5  # debounced >= 1.5x NOTIFY per transaction

#: The raw INSERT without a NOTIFY (baseline.INSERT is the same statement with one).
INSERT_NO_NOTIFY = """
INSERT INTO {jobs} (id, task, queue, args, kwargs, state) VALUES (%s, %s, 'default', %s, '{{}}', 'available')
"""


def debounce_supported() -> bool:
    """Whether this taskpg has ``TaskPG(notify_debounce=...)`` (checked when the cases are built)."""
    return "notify_debounce" in inspect.signature(TaskPG.__init__).parameters


# -- client processes ----------------------------------------------------------------------------

Go = Callable[[], None]  # a client calls it once set up; it returns when every client is


def _child(fn: Callable[..., Any], args: tuple[Any, ...], barrier: Any, results: Any) -> None:
    """A client process: ``fn(*args, go)``; its value (or its traceback) goes on ``results``."""
    try:
        value = fn(*args, lambda: barrier.wait(START_TIMEOUT))
    except BaseException:
        barrier.abort()
        results.put((False, traceback.format_exc()))
    else:
        results.put((True, value))


class Clients:
    """``with Clients(fn, [args, ...]) as clients:`` one process per ``args``, each running
    ``fn(*args, go)``. The block starts when every client has called ``go()`` (``clients.started``,
    a ``perf_counter()``, comparable across processes); :meth:`results` waits for their values."""

    def __init__(self, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> None:
        self._barrier = _PROCESSES.Barrier(len(args) + 1)
        self._results = _PROCESSES.Queue()
        self._procs = [
            _PROCESSES.Process(target=_child, args=(fn, a, self._barrier, self._results), daemon=True) for a in args
        ]
        self.started = 0.0

    def __enter__(self) -> Clients:
        for proc in self._procs:
            proc.start()
        try:
            self._barrier.wait(START_TIMEOUT)
        except threading.BrokenBarrierError:
            self._stop()
            raise BenchmarkError(f"a client process failed to start: {self._first_error()}") from None
        self.started = time.perf_counter()
        return self

    def results(self, timeout: float) -> list[Any]:
        values = []
        for _ in self._procs:
            ok, value = self._results.get(timeout=timeout)
            if not ok:
                raise BenchmarkError(f"a client process failed: {_last_line(value)}")
            values.append(value)
        return values

    def _first_error(self) -> str:
        with contextlib.suppress(Exception):
            return _last_line(str(self._results.get(timeout=5)[1]))
        return "(no traceback)"

    def _stop(self, wait: float = 10.0) -> None:
        for proc in self._procs:
            proc.join(wait)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop(10.0 if kind is None else 0.0)  # after a failure, do not wait for the clients


def _last_line(child_traceback: str) -> str:
    """The exception line of a client's traceback; the whole traceback goes to stderr."""
    print(child_traceback, file=sys.stderr)
    return child_traceback.strip().splitlines()[-1]


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of each part: ``n`` jobs numbered 0..n-1 shared as evenly as can be."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


# -- W6: bloat at a steady 5k jobs/s, and a long transaction -------------------------------------


def w6_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W6"])
    long_n = round(n * LONG_TX_LOAD)
    c = DRAIN_CONCURRENCY
    steady = f"{STEADY_BATCH} jobs every {STEADY_INTERVAL * 1000:g} ms"
    return [
        _case("W6/raw", f"raw COPY, {steady}; raw LISTEN consumer", n, _w6_raw, n=n, batch=STEADY_BATCH, once=True),
        _case("W6/taskpg", f"taskpg delay_many, {steady}; no vacuum", n, _w6_taskpg, n=n, **_w6_options(c)),
        _case(
            "W6/pruned",
            f"taskpg as W6 + beat's chore every {PRUNE_EVERY:g} s (prune after {PRUNE_KEEP:g} s, vacuum)",
            n,
            _w6_taskpg,
            n=n,
            keep=PRUNE_KEEP,
            **_w6_options(c),
        ),
        _case(
            "W6/longtx",
            f"taskpg as W6 + beat's chore every {PRUNE_EVERY:g} s (vacuum), with a long transaction",
            long_n,
            _w6_taskpg,
            n=long_n,
            keep=KEEP_ALL,  # nothing pruned: the jobs/s windows are read from finished_at
            long_tx=True,
            **_w6_options(c),
        ),
    ]


def _w6_options(c: int) -> dict[str, Any]:
    return {"concurrency": c, "batch": STEADY_BATCH, "once": True}


def _steady_producer(dsn: str, schema: str, n: int, raw: bool, go: Go) -> tuple[float, float]:
    """Enqueue ``n`` jobs in batches of 50 every 10 ms (catching up when late); returns
    the ``perf_counter()`` at the first and after the last batch."""
    batches = _split(n, -(-n // STEADY_BATCH))
    if raw:
        with connect(dsn, autocommit=False) as conn:
            statement, channel = render(baseline.COPY, schema), _channel(schema)
            go()
            return _timed(lambda i: baseline.copy_batch(conn, statement, *batches[i], NOOP, channel), len(batches))
    app = _app(Bench(dsn, redis_url=None), schema)
    try:
        task = app.tasks[NOOP]
        go()
        return _timed(lambda i: task.delay_many([(j,) for j in range(*_span(batches[i]))]), len(batches))
    finally:
        app.close()


def _span(part: tuple[int, int]) -> tuple[int, int]:
    return part[0], part[0] + part[1]


def _timed(enqueue: Callable[[int], Any], batches: int) -> tuple[float, float]:
    started = time.perf_counter()
    _spaced(enqueue, batches, STEADY_INTERVAL)
    return started, time.perf_counter()


def _w6_raw(bench: Bench, schema: str, n: int) -> Measurement:
    """The raw steady cycle: COPY 50 jobs + NOTIFY every 10 ms from a process; one LISTENing
    connection claims (batches of 200) and finishes them; then the table's size."""
    with (
        baseline.ListeningConsumer(bench.dsn, schema, _channel(schema), RAW_DRAIN["batch"]),
        Clients(_steady_producer, [(bench.dsn, schema, n, True)]) as producer,
    ):
        [(started, produced)] = producer.results(_load_timeout(n))
        drained = wait_drained(bench.dsn, schema, _drain_timeout(n))
    expect_count(bench.dsn, schema, "succeeded", n)
    return _steady_measurement(bench, schema, n, started, produced, drained)


def _w6_taskpg(bench: Bench, schema: str, n: int, keep: float | None = None, long_tx: bool = False) -> Measurement:
    """An idle in-process worker at -c 8, then ``n`` jobs at 5k/s from a producer process; with
    ``keep`` finished jobs are pruned as beat would; with ``long_tx`` a snapshot is held for a while."""
    app = _app(bench, schema)
    try:
        with (
            InProcessWorker(app, concurrency=DRAIN_CONCURRENCY),
            Pruner(app, keep) as pruner,
            Clients(_steady_producer, [(bench.dsn, schema, n, False)]) as producer,
        ):
            held = _hold_snapshot(bench.dsn, n / STEADY_RATE) if long_tx else None
            [(started, produced)] = producer.results(_load_timeout(n))
            drained = wait_drained(bench.dsn, schema, _drain_timeout(n))
    finally:
        app.close()
    _expect_finished(bench.dsn, schema, n, pruner.deleted)
    measurement = _steady_measurement(bench, schema, n, started, produced, drained)
    measurement.extra["pruned"] = pruner.deleted
    if held is not None:
        windows = throughput_windows(bench.dsn, schema, *held)
        measurement.extra.update(windows)
        measurement.note += f", after/before {windows['after_vs_before']:.2f}"
    return measurement


def _load_timeout(n: int) -> float:
    return 60.0 + 3 * n / STEADY_RATE


def _steady_measurement(
    bench: Bench, schema: str, n: int, started: float, produced: float, drained: float
) -> Measurement:
    """``n`` jobs from the first enqueue until drained; the table's size at the end in ``extra``."""
    bloat = table_bloat(bench.dsn, schema)
    extra = {"enqueue_jobs_per_s": round(n / (produced - started)), "drain_tail_s": round(drained - produced, 3)}
    return Measurement(n, drained - started, extra={**extra, **bloat}, note=f"bloat {bloat['bloat']:.2f}x")


def _expect_finished(dsn: str, schema: str, n: int, pruned: int) -> None:
    """Every job succeeded: ``n - pruned`` rows are left, all 'succeeded' (nothing else)."""
    counts = state_counts(dsn, schema)
    if counts != ({"succeeded": n - pruned} if n > pruned else {}):
        raise BenchmarkError(f"expected {n - pruned} succeeded jobs ({pruned} pruned), the database has {counts}")


class Pruner(BackgroundLoop):
    """``with Pruner(app, keep):`` beat's maintenance chore (``Beat.maintain``: retention pruning, then
    VACUUM (ANALYZE) where autovacuum is off) every PRUNE_EVERY seconds, succeeded jobs kept ``keep``
    seconds. Does nothing when ``keep`` is None."""

    name = "bench-pruner"

    def __init__(self, app: TaskPG, keep: float | None) -> None:
        super().__init__()
        self.app, self.keep = app, keep
        self.deleted = 0

    def run(self) -> None:
        self.ready.set()
        if self.keep is None:
            return
        self.app.set_retention(succeeded=self.keep)
        beat = Beat(self.app, leader_election=False, flush_buffer=False)
        while not self.stop.wait(PRUNE_EVERY):
            self.deleted += beat.maintain()


def _hold_snapshot(dsn: str, load_seconds: float) -> tuple[dt.datetime, dt.datetime]:
    """Wait out the "before" share of the load, then hold a REPEATABLE READ snapshot (and an xid)
    for the "during" share; returns when it began and ended (database clock)."""
    time.sleep(LONG_TX_BEFORE * load_seconds)
    with connect(dsn, autocommit=False) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        began = _one(conn, "SELECT now(), txid_current()")
        time.sleep(LONG_TX_HOLD * load_seconds)
        ended = _one(conn, "SELECT clock_timestamp()")
        conn.commit()
    return began, ended


def _row(conn: psycopg.Connection[Any], statement: str, params: Any = None) -> tuple[Any, ...]:
    row = conn.execute(statement, params).fetchone()
    assert row is not None
    return tuple(row)


def _one(conn: psycopg.Connection[Any], statement: str, params: Any = None) -> Any:
    return _row(conn, statement, params)[0]


WINDOW = """
SELECT count(*) FILTER (WHERE finished_at >= %(a)s AND finished_at < %(b)s),
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at))
           FILTER (WHERE created_at >= %(a)s AND created_at < %(b)s)
FROM {jobs}
"""
PER_SECOND = """
SELECT floor(extract(epoch FROM finished_at - %(t0)s))::int, count(*) FROM {jobs} GROUP BY 1 ORDER BY 1
"""


def throughput_windows(dsn: str, schema: str, began: dt.datetime, ended: dt.datetime) -> dict[str, Any]:
    """Jobs finished per second and enqueue->start latency before, during and after the long
    transaction (the load spans the first to the last ``created_at``); jobs finished per second."""
    with connect(dsn) as conn:
        first, last = _row(conn, render("SELECT min(created_at), max(created_at) FROM {jobs}", schema))
        facts: dict[str, Any] = {"long_tx_s": round((ended - began).total_seconds(), 2)}
        for name, (a, b) in {"before": (first, began), "during": (began, ended), "after": (ended, last)}.items():
            finished, latency = _row(conn, render(WINDOW, schema), {"a": a, "b": b})
            facts[f"{name}_jobs_per_s"] = round(finished / max((b - a).total_seconds(), 1e-3))
            p50, p99 = latency or (None, None)
            facts[f"{name}_lag_ms"] = [_ms(p50), _ms(p99)]  # p50, p99 of started_at - created_at
        rows = conn.execute(render(PER_SECOND, schema), {"t0": first}).fetchall()
    counts = dict(rows)
    facts["finished_per_s"] = [counts.get(s, 0) for s in range(max(counts, default=-1) + 1)]
    before = facts["before_jobs_per_s"]
    facts["after_vs_before"] = round(facts["after_jobs_per_s"] / before, 3) if before else 0.0
    facts["recovered"] = facts["after_vs_before"] >= RECOVERED
    return facts


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


SIZES = """
SELECT pg_total_relation_size(%(t)s::regclass), pg_relation_size(%(t)s::regclass), pg_indexes_size(%(t)s::regclass),
       (SELECT count(*) FROM {table}), (SELECT coalesce(sum(pg_column_size(r.*)), 0) FROM {table} r)
"""


def table_bloat(dsn: str, schema: str) -> dict[str, Any]:
    """The jobs table's size (heap + indexes + TOAST) against its live rows repacked.

    "Live data" is what VACUUM FULL would leave: the live rows copied into a temporary table
    with the same columns, fillfactor and indexes, the indexes rebuilt. ``bloat`` is the ratio of
    the two; ``tuple_ratio`` compares with the bare bytes of the live rows (``pg_column_size``).
    """
    jobs = sql.Identifier(schema, "jobs")
    with connect(dsn, autocommit=False) as conn:
        total, heap, indexes, rows, tuple_bytes = _sizes(conn, jobs)
        reloptions = _one(conn, "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", [jobs.as_string()]) or []
        fill = [o for o in reloptions if o.startswith("fillfactor=")]
        compact = sql.Identifier("bench_compact")
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING ALL) {}").format(
                compact, jobs, sql.SQL(f"WITH ({fill[0]})" if fill else "")
            )
        )
        conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(compact, jobs))
        conn.execute(sql.SQL("REINDEX TABLE {}").format(compact))
        live_total, live_heap, live_indexes, _, _ = _sizes(conn, compact)
        autovacuum = _one(conn, "SHOW autovacuum")
        conn.rollback()
    mb = 1024 * 1024
    return {
        "bloat": round(total / live_total, 3),
        "tuple_ratio": round(total / tuple_bytes, 2) if tuple_bytes else None,
        "total_mb": round(total / mb, 2),
        "heap_mb": round(heap / mb, 2),
        "indexes_mb": round(indexes / mb, 2),
        "live_mb": round(live_total / mb, 2),
        "live_heap_mb": round(live_heap / mb, 2),
        "live_indexes_mb": round(live_indexes / mb, 2),
        "live_rows": rows,
        "live_tuple_mb": round(tuple_bytes / mb, 2),
        "autovacuum": autovacuum,
        "reloptions": reloptions,
    }


def _sizes(conn: psycopg.Connection[Any], table: sql.Identifier) -> tuple[int, int, int, int, int]:
    statement = sql.SQL(SIZES).format(table=table)
    total, heap, indexes, rows, tuple_bytes = map(int, _row(conn, statement.as_string(), {"t": table.as_string()}))
    return total, heap, indexes, rows, tuple_bytes


# -- W7: enqueue from 8 clients, NOTIFY per transaction vs debounced -----------------------------


def w7_cases(bench: Bench) -> list[Case]:
    n = bench.size(ISSUE_SIZES["W7"], FLOORS["W7"])
    c = W7_CLIENTS
    cases = [
        _case("W7/raw/notify", "raw INSERT + pg_notify, autocommit", n, _w7, n=n, client=_raw_client, setting=True),
        _case("W7/raw/plain", "raw INSERT, no NOTIFY, autocommit", n, _w7, n=n, client=_raw_client, setting=False),
        _case(
            "W7/taskpg/notify",
            "delay(), NOTIFY per transaction (default)",
            n,
            _w7,
            n=n,
            client=_taskpg_client,
            setting={},
            baseline="W7/raw/notify",
        ),
    ]
    if debounce_supported():
        cases.append(
            _case(
                "W7/taskpg/debounced",
                f"delay(), notify_debounce={NOTIFY_DEBOUNCE:g}",
                n,
                _w7,
                n=n,
                client=_taskpg_client,
                setting={"notify_debounce": NOTIFY_DEBOUNCE},
                baseline="W7/raw/plain",
            )
        )
    return [dataclasses.replace(case, concurrency=c) for case in cases]


def _w7(bench: Bench, schema: str, n: int, client: Callable[..., float], setting: Any) -> Measurement:
    """8 client processes, each enqueuing its share one autocommit call at a time; timed from when
    all are connected until the last one's last call returned. A LISTEN connection counts NOTIFYs.

    ``setting`` is the client's last argument: the raw client's ``notify``, taskpg's app options.
    """
    args = [(bench.dsn, schema, first, count, setting) for first, count in _split(n, W7_CLIENTS)]
    with NotifyCounter(bench.dsn, _channel(schema)) as notifications, Clients(client, args) as clients:
        ended = max(clients.results(60.0 + n / 100))
    expect_count(bench.dsn, schema, "available", n)
    return Measurement(n, ended - clients.started, extra={"notifications": notifications.count})


def _taskpg_client(dsn: str, schema: str, first: int, count: int, options: dict[str, Any], go: Go) -> float:
    """``task.delay(i)`` for each of its jobs on its own app; returns when the last call returned."""
    app = _app(Bench(dsn, redis_url=None), schema, **options)
    try:
        task = app.tasks[NOOP]
        go()
        for i in range(first, first + count):
            task.delay(i)
        return time.perf_counter()
    finally:
        app.close()


def _raw_client(dsn: str, schema: str, first: int, count: int, notify: bool, go: Go) -> float:
    """The same INSERT from plain psycopg (autocommit), with or without ``pg_notify`` in it."""
    statement = render(baseline.INSERT if notify else INSERT_NO_NOTIFY, schema)
    tail = (_channel(schema),) if notify else ()
    with connect(dsn) as conn:
        go()
        for i in range(first, first + count):
            conn.execute(statement, (str(uuid.uuid4()), NOOP, json.dumps([i]), *tail))
        return time.perf_counter()


class NotifyCounter(BackgroundLoop):
    """``with NotifyCounter(dsn, channel) as counter:`` LISTEN in a thread; ``counter.count`` is
    how many notifications arrived (a worker would be woken that often)."""

    name = "bench-notify-counter"

    def __init__(self, dsn: str, channel: str) -> None:
        super().__init__()
        self.dsn, self.channel = dsn, channel
        self.count = 0

    def run(self) -> None:
        with connect(self.dsn) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self.ready.set()
            while not self.stop.is_set():
                self.count += sum(1 for _ in conn.notifies(timeout=0.1))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        time.sleep(0.2)  # the last (debounced) notifications
        super().__exit__(kind, exc, tb)


STEADY_WORKLOADS = [
    Workload("W6", "bloat at a steady 5k jobs/s; recovery after a long transaction", w6_cases),
    Workload("W7", "enqueue from 8 client processes, NOTIFY per transaction vs debounced", w7_cases),
]
