"""docs/periodic.md: beat's ticks, time zones and DST, catch-up, exactly once with many beats, failover, retention."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from support.example_runner import run_example
from support.paths import SUPPORT, TESTS

from taskpg import ConfigurationError, TaskPG
from taskpg.beat import Beat
from taskpg.periodic import Schedule

if TYPE_CHECKING:
    from pathlib import Path

    import psycopg

UTC = dt.timezone.utc


def at(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


# -- pure tick arithmetic ---------------------------------------------------------------------------


def test_cron_ticks_in_a_time_zone() -> None:
    daily = Schedule("report", "t", cron="0 8 * * *", timezone="Europe/Madrid")
    # 08:00 in Madrid is 07:00 UTC in winter and 06:00 UTC in summer.
    assert daily.next_after(at(2026, 1, 10, 12, 0)) == at(2026, 1, 11, 7, 0)
    assert daily.next_after(at(2026, 7, 10, 12, 0)) == at(2026, 7, 11, 6, 0)


def test_dst_spring_forward_fires_once_at_the_next_valid_time() -> None:
    night = Schedule("night", "t", cron="30 2 * * *", timezone="Europe/Madrid", catch_up="all")
    # 2026-03-29: clocks jump from 02:00 to 03:00 in Madrid; 02:30 does not exist that night.
    ticks = night.recent_ticks(at(2026, 3, 28, 12, 0), at(2026, 3, 30, 12, 0), 10)
    assert ticks == [at(2026, 3, 29, 1, 0), at(2026, 3, 30, 0, 30)]  # 03:00 CEST, then 02:30 CEST


def test_dst_fall_back_fires_for_each_occurrence_as_croniter_does() -> None:
    night = Schedule("night", "t", cron="30 2 * * *", timezone="Europe/Madrid", catch_up="all")
    # 2026-10-25: 02:30 happens twice in Madrid (CEST, then CET).
    ticks = night.recent_ticks(at(2026, 10, 24, 12, 0), at(2026, 10, 25, 12, 0), 10)
    assert ticks == [at(2026, 10, 25, 0, 30), at(2026, 10, 25, 1, 30)]


def test_every_ticks_are_aligned_so_all_beats_agree() -> None:
    every = Schedule("e", "t", every=15)
    assert every.next_after(at(2026, 1, 1, 0, 0, 7)) == at(2026, 1, 1, 0, 0, 15)
    assert every.next_after(at(2026, 1, 1, 0, 0, 15)) == at(2026, 1, 1, 0, 0, 30)


def test_catch_up_policies_after_downtime() -> None:
    last, now = at(2026, 1, 1, 0, 0), at(2026, 1, 1, 0, 10, 2)  # ten minutes down
    latest = Schedule("a", "t", cron="* * * * *")
    skip = Schedule("b", "t", cron="* * * * *", catch_up="skip")
    every_tick = Schedule("c", "t", cron="* * * * *", catch_up="all", catch_up_limit=4)
    assert latest.due(last, now) == [at(2026, 1, 1, 0, 10)]
    assert skip.due(last, now) == [at(2026, 1, 1, 0, 10)]  # 2 s late: not a missed tick
    assert skip.due(last, at(2026, 1, 1, 0, 10, 30)) == []  # 30 s late: missed, skipped
    assert every_tick.due(last, now) == [at(2026, 1, 1, 0, minute) for minute in (7, 8, 9, 10)]
    assert latest.due(now, now) == []


def test_invalid_schedules_fail_at_declaration(app: TaskPG) -> None:
    with pytest.raises(ConfigurationError, match="cron="):
        app.task(cron="every day at noon")
    with pytest.raises(ConfigurationError, match="catch_up="):
        app.task(cron="* * * * *", catch_up="some")

    @app.task
    def job(n: int) -> None:
        return None

    with pytest.raises(ConfigurationError, match="not a valid cron"):
        app.add_periodic(job, cron="61 * * * *", args=(1,))
    with pytest.raises(ConfigurationError, match="exactly one of cron= or every="):
        app.add_periodic(job, args=(1,))
    with pytest.raises(Exception, match="not JSON"):
        app.add_periodic(job, every=5, args=(object(),))


# -- against Postgres, with a driven clock ----------------------------------------------------------


def jobs_by_tick(db: psycopg.Connection, app: TaskPG) -> dict[tuple[str, dt.datetime], int]:
    rows = db.execute(
        f'SELECT t.schedule, t.tick, count(j.id) FROM "{app.schema}".periodic_ticks t '
        f'JOIN "{app.schema}".jobs j ON j.id = t.job_id GROUP BY 1, 2'
    ).fetchall()
    return {(name, tick): count for name, tick, count in rows}


def test_beat_fires_each_tick_once_and_catches_up(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(cron="*/5 * * * *")
    def report() -> None:
        return None

    @app.task
    def ping(target: str) -> None:
        return None

    app.add_periodic(ping, every=60, args=("db",), name="ping-db", catch_up="all", catch_up_limit=3)
    beat = Beat(app)
    assert beat.tick(at(2026, 1, 1, 0, 0, 30)) == []  # first sight: nothing missed yet
    fired = beat.tick(at(2026, 1, 1, 0, 1, 0, 200))
    assert [(f.schedule, f.tick) for f in fired] == [("ping-db", at(2026, 1, 1, 0, 1))]
    assert beat.tick(at(2026, 1, 1, 0, 1, 5)) == []  # same tick again: nothing
    # Down for an hour: the report fires its latest tick once; ping-db runs its last 3 ticks.
    fired = beat.tick(at(2026, 1, 1, 1, 0, 1))
    assert sorted((f.schedule, f.tick) for f in fired) == sorted(
        [(report.name, at(2026, 1, 1, 1, 0))]
        + [("ping-db", at(2026, 1, 1, 0, m)) for m in (58, 59)]
        + [("ping-db", at(2026, 1, 1, 1, 0))]
    )
    counts = jobs_by_tick(db, app)
    assert set(counts.values()) == {1} and len(counts) == 5
    args = db.execute(f'SELECT DISTINCT args FROM "{app.schema}".jobs WHERE task = %s', (ping.name,)).fetchall()
    assert args == [(["db"],)]
    # A restarted beat (fresh memory) continues from the database, not from scratch.
    assert Beat(app).tick(at(2026, 1, 1, 1, 0, 30)) == []


def test_three_racing_beats_without_a_leader_fire_each_tick_once(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(every=1, catch_up="all")
    def heartbeat() -> None:
        return None

    beats = [Beat(app, leader_election=False, interval=0.05) for _ in range(3)]
    threads = [threading.Thread(target=b.run) for b in beats]
    for thread in threads:
        thread.start()
    time.sleep(4.5)
    for beat in beats:
        beat.stop()
    for thread in threads:
        thread.join(5)
    counts = jobs_by_tick(db, app)
    assert len(counts) >= 3 and set(counts.values()) == {1}
    ticks = sorted(tick for _, tick in counts)
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(ticks)), ticks


def test_only_the_leader_fires(app: TaskPG, db: psycopg.Connection) -> None:
    @app.task(every=1)
    def heartbeat() -> None:
        return None

    first, second = Beat(app), Beat(app)
    assert first.lead() is True
    assert second.lead() is False
    first.reset_connection()  # the leader's session ends; its backend frees the lock as it exits
    deadline = time.monotonic() + 5
    while not second.lead():
        assert time.monotonic() < deadline, "the lock was not released"
        time.sleep(0.05)


def beat_process(pg_dsn: str, schema: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TASKPG_DSN": pg_dsn, "TASKPG_SCHEMA": schema, "PYTHONPATH": str(SUPPORT)}
    return subprocess.Popen(
        [sys.executable, "-m", "taskpg", "beat", "-A", "beat_tasks", "-l", "info"],
        cwd=TESTS,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


@pytest.mark.slow
def test_killing_the_leader_hands_over_without_doubling_or_losing_ticks(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    beats = [beat_process(pg_dsn, migrated_schema, log) for log in logs]
    try:
        deadline = time.monotonic() + 15
        leader = None
        while leader is None:
            assert time.monotonic() < deadline, "no beat became the leader"
            leader = next((i for i, log in enumerate(logs) if "is now the leader" in log.read_text()), None)
            time.sleep(0.1)
        time.sleep(3)
        beats[leader].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        follower = 1 - leader
        while "is now the leader" not in logs[follower].read_text():
            assert time.monotonic() - killed_at < 30, "the follower did not take over"
            time.sleep(0.05)
        time.sleep(3)
    finally:
        for process in beats:
            process.send_signal(signal.SIGTERM)
            process.wait(10)
    rows = db.execute(
        f'SELECT t.tick, count(j.id) FROM "{migrated_schema}".periodic_ticks t '
        f'JOIN "{migrated_schema}".jobs j ON j.id = t.job_id GROUP BY 1 ORDER BY 1'
    ).fetchall()
    ticks = [tick for tick, _ in rows]
    assert {count for _, count in rows} == {1}  # no tick doubled
    assert len(ticks) >= 6
    # catch_up="all": the ticks missed during the handover were run too, so none is missing.
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(ticks)), ticks


def test_beat_list_shows_last_and_next(app: TaskPG, capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    from taskpg import cli

    @app.task(cron="0 8 * * *", timezone="Europe/Madrid")
    def morning() -> None:
        return None

    Beat(app).tick(at(2026, 1, 1, 0, 0))
    Beat(app).tick(at(2026, 1, 1, 7, 0, 1))
    monkeypatch.setattr(cli, "load_app", lambda spec: (app, "tests"))
    assert cli.main(["beat", "-A", "whatever", "--list"]) == 0
    out = capsys.readouterr().out
    assert morning.name in out and "cron '0 8 * * *' (Europe/Madrid)" in out
    assert "2026-01-01 07:00:00+00:00" in out  # last fired


# -- retention ------------------------------------------------------------------------------------------


def test_retention_prunes_by_age_count_and_queue(app: TaskPG, db: psycopg.Connection) -> None:
    from taskpg.retention import DAY, prune

    def finished(state: str, queue: str, days_ago: float, n: int = 1) -> None:
        db.execute(
            f'INSERT INTO "{app.schema}".jobs (id, task, queue, state, finished_at) '
            "SELECT gen_random_uuid(), 't', %s, %s, now() - %s * interval '1 day' FROM generate_series(1, %s)",
            (queue, state, days_ago, n),
        )

    finished("succeeded", "default", 2, 3)  # older than 24 h: pruned
    finished("succeeded", "default", 0.5, 2)  # kept
    finished("dead", "default", 3)  # dead are kept 7 days
    finished("dead", "default", 8)  # pruned
    finished("succeeded", "audit", 20, 2)  # its queue keeps succeeded jobs 30 days
    finished("succeeded", "chatty", 0.1, 10)  # at most 4 kept
    finished("available", "default", 0)  # not finished: never pruned, whatever its age
    app.set_retention("audit", succeeded=30 * DAY)
    app.set_retention("chatty", max_count=4)
    assert prune(app.store, app.retention) == 3 + 1 + 6
    left = dict(db.execute(f"SELECT queue || ':' || state, count(*) FROM \"{app.schema}\".jobs GROUP BY 1").fetchall())
    assert left == {
        "default:succeeded": 2,
        "default:dead": 1,
        "audit:succeeded": 2,
        "chatty:succeeded": 4,
        "default:available": 1,
    }


def test_maintenance_vacuums_the_jobs_table_when_autovacuum_does_not(app: TaskPG, db: psycopg.Connection) -> None:
    from taskpg.beat import Beat

    server_on = db.execute("SELECT current_setting('autovacuum')::bool AND current_setting('track_counts')::bool")
    assert app.store.autovacuum_active() == server_on.fetchone()[0]  # type: ignore[index]
    # Turned off on the table itself: never active, whatever the server says.
    db.execute(f'ALTER TABLE "{app.schema}".jobs SET (autovacuum_enabled = false)')
    assert app.store.autovacuum_active() is False
    db.execute(
        f'INSERT INTO "{app.schema}".jobs (id, task, queue, state, finished_at) '
        "SELECT gen_random_uuid(), 't', 'default', 'succeeded', now() - interval '2 days' FROM generate_series(1, 500)"
    )
    Beat(app, leader_election=False).maintain()  # prunes the 500 rows, then vacuums
    stats = db.execute(
        "SELECT last_vacuum IS NOT NULL, last_analyze IS NOT NULL, n_live_tup FROM pg_stat_user_tables "
        "WHERE schemaname = %s AND relname = 'jobs'",
        (app.schema,),
    ).fetchone()
    assert stats == (True, True, 0)


# -- examples/periodic_report.py: a simulated week of beat, each tick one job, nothing doubled -----------


def test_periodic_report_example(pg_dsn: str, schema: str, db: psycopg.Connection) -> None:
    stdout = run_example("periodic_report.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    lines = stdout.splitlines()
    assert "report jobs run: 5" in lines, stdout
    assert "sync-rates jobs run: 28" in lines, stdout  # every 6 h over the 167 h of a spring-forward week
    assert "jobs fired by the second beat: 0" in lines, stdout
    assert "  reports.weekday_report fired for Mon 2026-03-23 08:00 CET (07:00 UTC)" in lines, stdout
    assert any(line.startswith("one report: jobs by state: ") for line in lines), stdout

    # In Postgres: each report tick (08:00 in Madrid = 07:00 UTC in March, Monday to Friday) has exactly one job.
    rows = db.execute(
        f'SELECT t.tick, count(j.id), min(j.state) FROM "{schema}".periodic_ticks t '
        f'JOIN "{schema}".jobs j ON j.id = t.job_id WHERE t.schedule = %s GROUP BY t.tick ORDER BY t.tick',
        ("reports.weekday_report",),
    ).fetchall()
    assert rows == [(dt.datetime(2026, 3, day, 7, 0, tzinfo=UTC), 1, "succeeded") for day in range(23, 28)]
    jobs = db.execute(f'SELECT count(*) FROM "{schema}".jobs WHERE task = %s', ("reports.weekday_report",)).fetchone()
    assert jobs == (5,)  # no job outside the ticks either


def test_beat_on_an_unmigrated_schema_exits_2_and_says_to_migrate(pg_dsn: str, schema: str, tmp_path: Path) -> None:
    """A schema error is not retried for ever: the beat stops with code 2 and names the fix."""
    log = tmp_path / "beat.log"
    process = beat_process(pg_dsn, schema, log)
    try:
        assert process.wait(60) == 2
    finally:
        if process.poll() is None:
            process.kill()
    assert "taskpg migrate" in log.read_text()
