"""docs/canvas.md#exactly-once: a chord's body runs once, whatever the workers do, with real worker processes.

Members of one chord end at the same moment on different processes (the trigger counts them under the chord
row's lock); a worker killed with SIGKILL in the middle of a chord has its members rescued and run elsewhere,
and the body still runs once, with every member counted once.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import pytest
from support.processes import execution_count, wait_watching_workers

from taskpg import chain, chord, group

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import SimpleNamespace

    import psycopg
    from support.processes import WorkerProcess


def body_runs(db: psycopg.Connection, schema: str, body_ids: list[str]) -> dict[str, int]:
    rows = db.execute(
        f'SELECT job_id::text, count(*) FROM "{schema}".executions WHERE job_id = ANY(%s::uuid[]) GROUP BY 1',
        [body_ids],
    ).fetchall()
    return dict(rows)


def test_chord_bodies_run_once_when_members_end_together_on_four_workers(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    workers = [spawn(concurrency=8) for _ in range(4)]
    for worker in workers:
        worker.wait_ready()
    chords = [chord([tasks.record.s(n) for n in range(4)], tasks.total.s())() for _ in range(200)]
    results = [c.get(timeout=60) for c in chords]
    assert results == [0 + 1 + 2 + 3] * 200
    runs = body_runs(db, migrated_schema, [c.id for c in chords])
    assert runs == {c.id: 1 for c in chords}  # every body once, none twice
    pids = db.execute(f'SELECT count(DISTINCT pid) FROM "{migrated_schema}".executions').fetchone()
    assert pids is not None and pids[0] >= 2  # the members really ran on several processes
    (counted,) = db.execute(
        f'SELECT count(*) FROM "{migrated_schema}".chords WHERE done = size AND failed_by IS NULL'
    ).fetchone() or (0,)
    assert counted == 200
    for worker in workers:
        worker.stop()


@pytest.mark.slow
def test_a_worker_killed_mid_chord_loses_nothing_and_the_body_runs_once(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    first = spawn(concurrency=16)
    first.wait_ready()
    res = chord([tasks.sleepy.s(1.5, n) for n in range(12)], tasks.total.s())()
    wait_watching_workers(
        "the members to start on the first worker",
        lambda: execution_count(db, migrated_schema) >= 12,
        20,
        [first],
    )
    os.kill(first.pid, signal.SIGKILL)
    assert first.proc.wait(10) == -signal.SIGKILL
    killed_at = time.monotonic()
    second = spawn(concurrency=16)  # rescues the members of the dead worker and runs them again
    assert res.get(timeout=60) == sum(range(12))
    assert time.monotonic() - killed_at < 60
    assert body_runs(db, migrated_schema, [res.id]) == {res.id: 1}
    (done, size) = db.execute(f'SELECT done, size FROM "{migrated_schema}".chords').fetchone() or (0, 0)
    assert (done, size) == (12, 12)  # each member counted once, though it ran twice
    second.stop()


def test_a_group_of_ten_thousand_members_feeds_its_chord_body(
    spawn: Callable[..., WorkerProcess], tasks: SimpleNamespace, db: psycopg.Connection, migrated_schema: str
) -> None:
    workers = [spawn(concurrency=16) for _ in range(2)]
    for worker in workers:
        worker.wait_ready()
    res = (group(tasks.record.s(n) for n in range(10_000)) | tasks.total.s()).delay()
    assert res.get(timeout=120) == sum(range(10_000))
    assert body_runs(db, migrated_schema, [res.id]) == {res.id: 1}
    # and a chain after it keeps going
    tail = chain(tasks.record.s(1), tasks.record.s()).apply_async()  # record(1) then record(1)
    assert tail.get(timeout=30) == 1
    for worker in workers:
        worker.stop()
