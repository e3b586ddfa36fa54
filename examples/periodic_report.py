"""Periodic jobs: a report at 08:00 Madrid time on weekdays, and a task with arguments every six hours.

Run it against a Postgres you can write to:

    python examples/periodic_report.py

Configuration comes from the environment: ``TASKPG_DSN`` (default ``postgresql://postgres@127.0.0.1:5432/test``)
and ``TASKPG_SCHEMA`` (default ``taskpg_reports``).

The program migrates the schema and prints the next three fire times of each schedule. Then it simulates a
week without waiting for it. Two ``Beat`` objects, standing in for two ``taskpg beat`` processes, are driven by a
fake clock from Monday 23 March 2026 00:00 to Monday 30 March 00:00, Madrid time. The clock stops on every hour,
and on every minute from 07:55 to 08:05 Madrid time. The week ends with the spring-forward night. A ``Worker`` in
a thread runs the jobs. The program prints each report tick, how many jobs each schedule enqueued, and how many
the second beat added. The second beat adds none, because Postgres lets each tick be claimed once. Last, it prints
one report's result. Before the simulation, it deletes the ticks and jobs left by an earlier run, so every run
starts afresh.

In a real deployment nothing is simulated: run ``taskpg beat -A examples.periodic_report`` (two of them, for
availability) and ``taskpg worker -A examples.periodic_report``.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from taskpg import Beat, TaskPG, Worker, ops

if TYPE_CHECKING:
    from taskpg.beat import Fired

DSN = os.environ.get("TASKPG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = os.environ.get("TASKPG_SCHEMA", "taskpg_reports")

app = TaskPG(DSN, schema=SCHEMA)


@app.task(name="reports.weekday_report", cron="0 8 * * 1-5", timezone="Europe/Madrid")
def weekday_report() -> str:
    """A stand-in for a real report: how many jobs the queue holds in each state."""
    totals: Counter[str] = Counter()
    for states in ops.job_counts(app.store).values():
        totals.update(states)
    return "jobs by state: " + ", ".join(f"{state} {count}" for state, count in sorted(totals.items()))


@app.task(name="reports.sync_rates")
def sync_rates(base: str, symbols: list[str]) -> str:
    """A stand-in for a call to an exchange-rate API."""
    return f"{base}: {len(symbols)} rates refreshed"


# An existing task with arguments, on a schedule (Celery: app.add_periodic_task(6 * 3600, sync_rates.s(...))).
rates = app.add_periodic(
    sync_rates, every=dt.timedelta(hours=6), args=("EUR",), kwargs={"symbols": ["USD", "GBP"]}, name="sync-rates"
)


def local(moment: dt.datetime, zone: dt.tzinfo) -> str:
    """``moment`` as a wall-clock time in ``zone``, e.g. ``Mon 2026-03-23 08:00 CET``."""
    return moment.astimezone(zone).strftime("%a %Y-%m-%d %H:%M %Z")


def forget_earlier_runs() -> None:
    """Delete the ticks and jobs of this example's schedules, so the simulated week fires again."""
    schedules = app.schedules()
    with psycopg.connect(app.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE schedule = ANY(%s)").format(sql.Identifier(app.schema, "periodic_ticks")),
            ([s.name for s in schedules],),
        )
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE task = ANY(%s)").format(sql.Identifier(app.schema, "jobs")),
            ([s.task for s in schedules],),
        )


def main() -> None:
    app.migrate()  # same as `taskpg migrate`
    forget_earlier_runs()

    print("next fire times:")
    now = dt.datetime.now(dt.timezone.utc)
    for schedule in app.schedules():
        ticks, moment = [], now
        for _ in range(3):
            moment = schedule.next_after(moment)
            ticks.append(local(moment, schedule.zone))
        print(f"  {schedule.name}, {schedule.describe()}: {'; '.join(ticks)}")

    report = next(s for s in app.schedules() if s.task == weekday_report.name)
    # Monday 00:00 to the next Monday 00:00 in Madrid, in UTC so that adding a minute crosses DST correctly.
    start = dt.datetime(2026, 3, 23, tzinfo=report.zone).astimezone(dt.timezone.utc)
    end = dt.datetime(2026, 3, 30, tzinfo=report.zone).astimezone(dt.timezone.utc)
    print(f"simulating {local(start, report.zone)} to {local(end, report.zone)}")

    with Worker(app, queues=["default"], concurrency=2, grace=5).in_background():
        first, second = Beat(app), Beat(app)
        fired: list[Fired] = []
        duplicates = 0
        clock = start
        while clock <= end:  # the first round only records "now" as each schedule's starting point
            if clock.minute == 0 or dt.time(7, 55) <= clock.astimezone(report.zone).time() <= dt.time(8, 5):
                fired += first.tick(now=clock)
                duplicates += len(second.tick(now=clock))
            clock += dt.timedelta(minutes=1)

        reports = [f for f in fired if f.schedule == report.name]
        for f in reports:
            print(f"  {f.schedule} fired for {local(f.tick, report.zone)} ({f.tick:%H:%M} UTC)")
        results = {f.job_id: app.AsyncResult(f.job_id).get(timeout=30) for f in fired}
        print(f"report jobs run: {len(reports)}")
        print(f"{rates.name} jobs run: {sum(f.schedule == rates.name for f in fired)}")
        print(f"jobs fired by the second beat: {duplicates}")
        print(f"one report: {results[reports[-1].job_id]}")
    app.close()


if __name__ == "__main__":
    main()
