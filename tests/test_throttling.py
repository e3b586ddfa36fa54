"""docs/throttling.md: throttles, rate limits, queue caps, unique jobs and snoozes, under concurrency."""

from __future__ import annotations

import datetime as dt
import gc
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from support.paths import EXAMPLES

from taskpg import AsyncResult, ConfigurationError, TaskPG

if TYPE_CHECKING:
    from collections.abc import Iterator

EXAMPLE = EXAMPLES / "rate_limited_api.py"
TENANT_LINE = re.compile(r"^(\w+): (\d+) calls, at most (\d+) in any 1 s window$")
TENANTS = {"acme", "globex", "initech"}


# -- throttles -----------------------------------------------------------------------------------------


def test_throttle_across_8_processes_admits_exactly_one_per_key(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection
) -> None:
    import limit_tasks

    with multiprocessing.get_context("spawn").Pool(8) as pool:
        admitted = pool.starmap(limit_tasks.enqueue_throttled, [(pg_dsn, migrated_schema, 125, 10)] * 8)
    assert sum(admitted) == 10
    rows = db.execute(f'SELECT (args->>0)::int, count(*) FROM "{migrated_schema}".jobs GROUP BY 1').fetchall()
    assert sorted(rows) == [(user, 1) for user in range(10)]
    rejected = db.execute(f'SELECT sum(rejected) FROM "{migrated_schema}".throttle_windows').fetchone()
    assert rejected == (990,)


def test_throttle_drop_gives_a_throttled_handle_and_writes_nothing(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(throttle_key=lambda user_id, **_: f"u{user_id}", throttle="2/h")
    def remind(user_id: int, text: str = "") -> None:
        return None

    handles = [remind.delay(1, text=str(n)) for n in range(4)] + [remind.delay(2)]
    assert [h.throttled for h in handles] == [False, False, True, True, False]
    assert db.execute(f'SELECT count(*) FROM "{app.schema}".jobs').fetchone() == (3,)
    assert handles[2].status == "REVOKED"


def test_throttle_defer_schedules_into_the_next_free_window(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(throttle_key="{report}", throttle="1/h", throttle_mode="defer")
    def build(report: str) -> None:
        return None

    first, second, third = build.delay("sales"), build.delay("sales"), build.delay("sales")
    assert not any(h.throttled for h in (first, second, third))
    rows = dict(db.execute(f'SELECT id::text, run_at FROM "{app.schema}".jobs').fetchall())
    hour = dt.datetime.now(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
    assert rows[second.id] == hour + dt.timedelta(hours=1)
    assert rows[third.id] == hour + dt.timedelta(hours=2)
    assert second.status == "PENDING"


def test_a_key_naming_a_missing_argument_fails_at_declaration(app: TaskPG) -> None:
    for option in (
        {"throttle_key": "{customer}", "throttle": "1/m"},
        {"rate_limit_key": "{customer.id}", "rate_limit": "1/s"},
        {"unique_key": "{customer}"},
    ):
        with pytest.raises(ConfigurationError, match=re.escape("names 'customer', which is not one of its arguments")):

            @app.task(**option)
            def bill(account: int) -> None:
                return None

    @app.task(throttle_key="{customer}", throttle="1/m")  # **kwargs: any name may come
    def flexible(**payload: object) -> None:
        return None

    with pytest.raises(ConfigurationError, match=re.escape("throttle_key='{customer}' names 'customer'")):
        flexible.delay(account=3)  # but this call does not have it


def test_throttled_calls_roll_back_with_the_callers_transaction(app: TaskPG, pg_dsn: str) -> None:
    @app.task(throttle_key="{x}", throttle="1/h")
    def once(x: int) -> None:
        return None

    with psycopg.connect(pg_dsn) as conn:
        assert not once.apply_async(args=(1,), connection=conn).throttled
        conn.rollback()
    assert not once.delay(1).throttled  # the rolled-back call did not use up the window


# -- unique jobs ---------------------------------------------------------------------------------------


def test_unique_enqueues_under_a_race_yield_one_job(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(unique_key="account:{account}")
    def sync(account: int) -> None:
        return None

    barrier = threading.Barrier(8)
    ids: list[str] = []

    def enqueue() -> None:
        barrier.wait()
        ids.append(sync.delay(42).id)

    threads = [threading.Thread(target=enqueue) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert db.execute(f'SELECT count(*) FROM "{app.schema}".jobs').fetchone() == (1,)
    assert sync.delay(43).id != ids[0]


def test_unique_while_unfinished_frees_the_key_when_the_job_ends(app: TaskPG, run_worker: Any) -> None:
    @app.task(unique_key=True)
    def rebuild(index: str) -> str:
        return index

    first = rebuild.delay("products")
    assert rebuild.delay("products").id == first.id
    assert rebuild.delay("orders").id != first.id
    with run_worker(app):
        first.get(timeout=10)
    assert rebuild.delay("products").id != first.id  # the first one finished: a new job


def test_unique_for_holds_the_key_for_its_window_whatever_the_state(
    app: TaskPG, run_worker: Any, db: psycopg.Connection
) -> None:
    @app.task(unique_key="{page}", unique_for=1.0)
    def crawl(page: str) -> None:
        return None

    first = crawl.delay("home")
    with run_worker(app):
        first.get(timeout=10)
    assert crawl.delay("home").id == first.id  # finished, but within its second
    time.sleep(1.1)
    assert crawl.delay("home").id != first.id


def test_unique_bulk_and_buffered(buffered_app: TaskPG, db: psycopg.Connection) -> None:
    from taskpg.flusher import Flusher

    @buffered_app.task(unique_key="{n}")
    def item(n: int) -> None:
        return None

    ids = item.delay_many([(1,), (2,), (1,), (3,), (2,)])
    assert ids[0] == ids[2] and ids[1] == ids[4] and len(set(ids)) == 3
    buffered = [item.apply_async(args=(9,), via="buffer") for _ in range(3)]
    assert len({h.id for h in buffered}) == 1
    Flusher(buffered_app).drain()
    assert db.execute(f'SELECT count(*) FROM "{buffered_app.schema}".jobs').fetchone() == (4,)


def test_a_buffered_call_turned_away_by_a_unique_key_leads_to_the_holder(
    buffered_app: TaskPG, db: psycopg.Connection, run_worker: Any
) -> None:
    from taskpg.flusher import Flusher

    @buffered_app.task(unique_key="{order}")
    def charge(order: int) -> str:
        return f"charged {order}"

    direct = charge.delay(7)  # holds the key in Postgres; Redis knows nothing of it
    buffered = charge.apply_async(args=(7,), via="buffer")
    foreign = buffered_app.buffer.client  # another producer's envelope with the same key
    foreign_id = "0190a000-0000-7000-8000-000000000007"
    foreign.rpush(
        buffered_app.buffer.key,
        json.dumps({"id": foreign_id, "task": charge.name, "args": [7], "unique_key": f"{charge.name}:7"}),
    )
    assert buffered.id != direct.id and buffered.status == "PENDING"
    assert Flusher(buffered_app).drain() == 2
    schema = buffered_app.schema
    assert db.execute(f'SELECT count(*) FROM "{schema}".jobs').fetchone() == (1,)
    holders = db.execute(f'SELECT id::text, holder::text FROM "{schema}".duplicates ORDER BY id').fetchall()
    assert sorted(holders) == sorted([(buffered.id, direct.id), (foreign_id, direct.id)])
    info = buffered.record()
    assert info is not None and info["id"] == direct.id  # the handle reads the holder's row
    with run_worker(buffered_app):
        assert buffered.get(timeout=15) == "charged 7"
        assert AsyncResult(buffered_app, foreign_id).get(timeout=15) == "charged 7"
    assert buffered.status == "SUCCESS"
    assert Flusher(buffered_app).drain() == 0  # nothing left behind in Redis either


# -- rate limits and concurrency caps ----------------------------------------------------------------------


@pytest.fixture(params=["postgres", "redis"])
def limited_app(request: pytest.FixtureRequest, pg_dsn: str, migrated_schema: str) -> Iterator[TaskPG]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    application = TaskPG(pg_dsn, schema=migrated_schema, redis_url=redis_url)
    yield application
    application.close()
    if redis_url:
        import redis

        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"taskpg:{migrated_schema}:*"):
            client.delete(key)


def record_starts(db: psycopg.Connection, schema: str) -> None:
    db.execute(f'CREATE TABLE "{schema}".starts (n int, tenant text, started double precision, ended double precision)')


def run_workers_until_started(app: TaskPG, db: psycopg.Connection, workers: list[Any], count: int) -> None:
    """Run the workers until the task recorded ``count`` starts (60 s at most), then stop them."""
    for worker in workers:
        worker.__enter__()
    try:
        deadline = time.monotonic() + 60
        while db.execute(f'SELECT count(*) FROM "{app.schema}".starts').fetchone() != (count,):
            assert time.monotonic() < deadline, "the jobs did not finish"
            time.sleep(0.1)
    finally:
        for worker in workers:
            worker.__exit__(None, None, None)


def max_in_window(times: list[float], window: float = 1.0) -> int:
    times = sorted(times)
    best, left = 0, 0
    for right, moment in enumerate(times):
        while moment - times[left] >= window:
            left += 1
        best = max(best, right - left + 1)
    return best


def full_windows(times: list[float], limit: int, window: float) -> int:
    """How many back-to-back windows (each opening at the first start after the last one closed)
    held at least three quarters of ``limit`` starts."""
    times = sorted(times)
    full, index = 0, 0
    while index < len(times):
        opened = times[index]
        inside = [t for t in times[index:] if t < opened + window]
        full += len(inside) >= limit * 3 // 4
        index += len(inside)
    return full


def test_rate_limit_20_per_second_across_4_workers(
    limited_app: TaskPG, run_worker: Any, db: psycopg.Connection, pg_dsn: str
) -> None:
    app = limited_app
    record_starts(db, app.schema)
    local = threading.local()

    @app.task(rate_limit="20/s")
    def call_api(n: int) -> None:
        started = time.time()
        if getattr(local, "conn", None) is None:
            local.conn = psycopg.connect(pg_dsn, autocommit=True)
        local.conn.execute(f'INSERT INTO "{app.schema}".starts (n, started) VALUES (%s, %s)', (n, started))

    call_api.delay_many([(n,) for n in range(200)])
    # The workers run in this test process, which holds every earlier test's objects: a full garbage
    # collection of them pauses every thread for ~100 ms, more than the limiter's safety margin (40 ms
    # at 20/s), and a pause between the start check and the call moves the recorded start. A worker
    # process has no such heap.
    gc.collect()
    gc.freeze()
    try:
        run_workers_until_started(app, db, [run_worker(app, concurrency=8) for _ in range(4)], 200)
    finally:
        gc.unfreeze()
    starts = [row[0] for row in db.execute(f'SELECT started FROM "{app.schema}".starts').fetchall()]
    assert len(starts) == 200 and max_in_window(starts) <= 20
    # Not far slower than the limit allows: the starts come in full windows, one after another.
    assert full_windows(starts, 20, window=1.1) >= 5, sorted(starts)
    attempts = db.execute(f'SELECT max(attempt), max(snoozes) FROM "{app.schema}".jobs').fetchone()
    assert attempts == (1, 0)  # waiting for a slot spent no attempt and is not a snooze


def test_rate_limit_key_gives_each_tenant_its_own_limit(limited_app: TaskPG, run_worker: Any) -> None:
    app = limited_app
    starts: dict[str, list[float]] = {"a": [], "b": []}

    @app.task(rate_limit="5/s", rate_limit_key="{tenant}")
    def sync(tenant: str, n: int) -> None:
        starts[tenant].append(time.time())

    handles = [sync.delay(tenant, n) for n in range(15) for tenant in ("a", "b")]
    with run_worker(app, concurrency=10):
        for handle in handles:
            handle.get(timeout=30)
    assert {t: len(s) for t, s in starts.items()} == {"a": 15, "b": 15}
    assert max_in_window(starts["a"]) <= 5 and max_in_window(starts["b"]) <= 5
    assert max_in_window(starts["a"] + starts["b"]) > 5  # the tenants did not share one limit


def test_queue_concurrency_cap_is_never_exceeded(
    app: TaskPG, run_worker: Any, db: psycopg.Connection, pg_dsn: str
) -> None:
    record_starts(db, app.schema)
    app.queue("reports", concurrency=3)
    local = threading.local()

    @app.task(queue="reports")
    def render(n: int) -> None:
        started = time.time()
        time.sleep(0.05)
        if getattr(local, "conn", None) is None:
            local.conn = psycopg.connect(pg_dsn, autocommit=True)
        local.conn.execute(
            f'INSERT INTO "{app.schema}".starts (n, started, ended) VALUES (%s, %s, %s)', (n, started, time.time())
        )

    render.delay_many([(n,) for n in range(60)])
    run_workers_until_started(app, db, [run_worker(app, queues=["reports"], concurrency=4) for _ in range(3)], 60)
    spans = db.execute(f'SELECT started, ended FROM "{app.schema}".starts').fetchall()
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    assert peak == 3  # reached, never exceeded


def test_status_reports_throttled_and_snoozed_per_task(
    app: TaskPG, run_worker: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskpg import Snooze
    from taskpg.cli import main

    @app.task(name="limited.ping", throttle_key="{x}", throttle="1/h")
    def ping(x: int) -> None:
        return None

    runs: list[int] = []

    @app.task(name="limited.waits")
    def waits() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise Snooze(0)

    for _ in range(3):
        ping.delay(1)
    with run_worker(app):
        waits.delay().get(timeout=10)
    assert main(["status", "--dsn", app.dsn, "--schema", app.schema]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.split("throttled and snoozed, per task:")[1].splitlines() if line.strip()]
    assert rows == [["task", "throttled", "snoozed"], ["limited.ping", "2", "0"], ["limited.waits", "0", "2"]]


# -- combinations found in review -------------------------------------------------------------------


def test_unique_for_dedupes_buffered_enqueues(buffered_app: TaskPG) -> None:
    @buffered_app.task(unique_key="{page}", unique_for=30)
    def crawl(page: str) -> None:
        return None

    first = crawl.apply_async(args=("home",), via="buffer")
    assert crawl.apply_async(args=("home",), via="buffer").id == first.id
    assert crawl.apply_async(args=("about",), via="buffer").id != first.id


def test_a_unique_collision_takes_no_throttle_place_and_a_drop_holds_no_unique_key(
    app: TaskPG, db: psycopg.Connection
) -> None:
    @app.task(unique_key="{k}", throttle_key="all", throttle="2/h")
    def once_per_key(k: str) -> None:
        return None

    @app.task(unique_key="{k}", unique_for=3600, throttle_key="all", throttle="1/h")
    def rare(k: str) -> None:
        return None

    a = once_per_key.delay("a")
    assert once_per_key.delay("a").id == a.id  # collides: no throttle place used
    assert not once_per_key.delay("b").throttled  # the second place is still free
    assert rare.delay("x").throttled is False
    dropped = rare.delay("y")
    assert dropped.throttled
    assert db.execute(f'SELECT key FROM "{app.schema}".unique_locks ORDER BY key').fetchall() == [(f"{rare.name}:x",)]


def test_defer_never_runs_a_job_earlier_than_it_asked(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(throttle_key="k", throttle="1/h", throttle_mode="defer")
    def later() -> None:
        return None

    later.delay()
    deferred = later.apply_async(countdown=3 * 3600)  # asks for later than the next free window
    run_at, created_at = db.execute(
        f'SELECT run_at, created_at FROM "{app.schema}".jobs WHERE id = %s', (deferred.id,)
    ).fetchone()  # type: ignore[misc]
    assert (run_at - created_at).total_seconds() >= 3 * 3600 - 1


def test_task_and_queue_limits_together_do_not_leak_places(
    app: TaskPG, run_worker: Any, db: psycopg.Connection
) -> None:
    app.queue("api", rate_limit="2/s")

    @app.task(queue="api", rate_limit="3/5s")
    def call() -> None:
        return None

    handles = [call.delay() for _ in range(3)]
    with run_worker(app, queues=["api"], concurrency=3):
        for handle in handles:
            handle.get(timeout=15)
    # Each job reserved one start under each limit and came back to it without asking again: a job that
    # asked again, or a place taken and not used, would show as more than 3 grants on a key.
    prefix = f"taskpg:{app.schema}:rate:"
    grants = dict(db.execute(f'SELECT key, granted FROM "{app.schema}".rate_limits').fetchall())
    assert grants == {prefix + call.name: 3, prefix + "queue:api": 3}, grants


def test_an_unreachable_limiter_defers_jobs_and_the_worker_keeps_going(
    pg_dsn: str, migrated_schema: str, run_worker: Any, db: psycopg.Connection
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url="redis://127.0.0.1:1/0")  # nothing listens

    @app.task(rate_limit="5/s")
    def limited() -> None:
        return None

    @app.task
    def free() -> int:
        return 1

    handle = limited.delay()
    with run_worker(app, concurrency=2):
        time.sleep(1.5)
        assert free.delay().get(timeout=10) == 1  # the runner threads are alive
    state, attempt = db.execute(
        f'SELECT state, attempt FROM "{migrated_schema}".jobs WHERE id = %s', (handle.id,)
    ).fetchone()  # type: ignore[misc]
    # Put back for a retry in 1 s (scheduled), or handed back unstarted at shutdown (available):
    # either way waiting, and no attempt spent.
    assert state in {"scheduled", "available"} and attempt == 0
    app.close()


def test_unique_for_holds_when_redis_is_down(pg_dsn: str, migrated_schema: str, db: psycopg.Connection) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema, redis_url="redis://127.0.0.1:1/0")  # nothing listens

    @app.task(unique_key="{k}", unique_for=60, via="buffer")
    def once(k: str) -> None:
        return None

    assert once.delay("a").id == once.delay("a").id  # both fell back to Postgres, with the unique check
    assert db.execute(f'SELECT count(*) FROM "{migrated_schema}".jobs').fetchone() == (1,)
    app.close()


# -- examples/rate_limited_api.py: every tenant at 5 calls per second, with either limiter ----------------


def run_rate_limited_api(pg_dsn: str, schema: str, redis_url: str | None) -> str:
    env = {**os.environ, "TASKPG_DSN": pg_dsn, "TASKPG_SCHEMA": schema}
    env.pop("TASKPG_REDIS_URL", None)
    if redis_url is not None:
        env["TASKPG_REDIS_URL"] = redis_url
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def check_output(stdout: str, limiter: str) -> None:
    lines = stdout.splitlines()
    assert f"rate limit: 5 calls per second per tenant ({limiter} limiter)" in lines, stdout
    per_tenant = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in map(TENANT_LINE.match, lines) if m}
    assert set(per_tenant) == TENANTS, stdout
    for tenant, (calls, busiest) in per_tenant.items():
        assert calls == 20, f"{tenant}: {stdout}"
        assert 1 <= busiest <= 5, f"{tenant}: {stdout}"
    total = re.search(r"^total: 60 calls in (\d+\.\d) s$", stdout, re.MULTILINE)
    assert total is not None, stdout
    assert float(total.group(1)) >= 3.0, stdout  # 20 calls at 5/s need at least three full windows after the first


def test_rate_limited_api_postgres_limiter(pg_dsn: str, schema: str) -> None:
    check_output(run_rate_limited_api(pg_dsn, schema, None), "Postgres")


def test_rate_limited_api_redis_limiter(pg_dsn: str, schema: str, redis_url: str) -> None:
    try:
        check_output(run_rate_limited_api(pg_dsn, schema, redis_url), "Redis")
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"taskpg:{schema}:*"))
        if keys:
            client.delete(*keys)
