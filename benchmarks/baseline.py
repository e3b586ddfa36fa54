"""The raw-SQL baseline: the same SQL cycle from plain psycopg, no taskpg code.

COPY jobs in (one transaction and one NOTIFY per batch); insert one job per statement; claim
batches with ``FOR UPDATE SKIP LOCKED`` walking the claim index in order; mark a batch done with
one ``unnest`` UPDATE fenced by the lease. taskpg is reported as a ratio of these numbers: they are
what Postgres and psycopg allow on this machine for the same work.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from .background import BackgroundLoop
from .pg import connect, render

if TYPE_CHECKING:
    from collections.abc import Iterator

COPY = "COPY {jobs} (id, task, queue, args, kwargs, state) FROM STDIN"

INSERT = """
WITH inserted AS (
    INSERT INTO {jobs} (id, task, queue, args, kwargs, state) VALUES (%s, %s, 'default', %s, '{{}}', 'available')
    RETURNING queue
)
SELECT pg_notify(%s, queue) FROM inserted
"""

CLAIM = """
WITH picked AS (
    SELECT id FROM {jobs}
    WHERE state = 'available' AND queue = 'default'
    ORDER BY priority DESC, run_at, id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
UPDATE {jobs} AS j SET state = 'running', attempt = j.attempt + 1, started_at = now(), lease = gen_random_uuid()
FROM picked WHERE j.id = picked.id
RETURNING j.id, j.task, j.args, j.kwargs, j.attempt, j.lease
"""

FINISH = """
UPDATE {jobs} AS j SET state = 'succeeded', finished_at = now(), result = 'null'
FROM unnest(%s::uuid[], %s::uuid[]) AS o(id, lease)
WHERE j.id = o.id AND j.state = 'running' AND j.lease = o.lease
"""


def _rows(start: int, count: int, task: str) -> Iterator[tuple[str, str, str, str, str, str]]:
    for i in range(start, start + count):
        yield (str(uuid.uuid4()), task, "default", json.dumps([i]), "{}", "available")


def copy_enqueue(dsn: str, schema: str, n: int, batch: int, task: str, channel: str) -> float:
    """COPY ``n`` jobs in batches (one transaction + NOTIFY each); returns the seconds taken."""
    statement = render(COPY, schema)
    with connect(dsn, autocommit=False) as conn:
        started = time.perf_counter()
        for start in range(0, n, batch):
            copy_batch(conn, statement, start, min(batch, n - start), task, channel)
        return time.perf_counter() - started


def copy_batch(conn: psycopg.Connection[Any], statement: str, start: int, count: int, task: str, channel: str) -> None:
    """COPY ``count`` jobs (args ``[start]``...) with ``statement`` (:data:`COPY` rendered), NOTIFY, commit."""
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for row in _rows(start, count, task):
            copy.write_row(row)
    conn.execute("SELECT pg_notify(%s, 'default')", [channel])
    conn.commit()


def insert_latencies(dsn: str, schema: str, n: int, task: str, channel: str, in_transaction: bool) -> list[float]:
    """Insert ``n`` jobs one statement each; returns each insert's seconds.

    ``in_transaction``: each insert runs inside a transaction the caller opened (its COMMIT is the
    caller's and is not timed); otherwise every insert commits on its own (autocommit).
    """
    statement = render(INSERT, schema)
    timings = []
    with connect(dsn, autocommit=not in_transaction) as conn:
        for i in range(n):
            if in_transaction:
                conn.execute("SELECT 1")  # the caller's own work opens its transaction
            started = time.perf_counter()
            conn.execute(statement, (str(uuid.uuid4()), task, json.dumps([i]), channel))
            timings.append(time.perf_counter() - started)
            if in_transaction:
                conn.commit()
    return timings


def _drain_loop(conn: psycopg.Connection[Any], schema: str, batch: int) -> int:
    claim, finish = render(CLAIM, schema), render(FINISH, schema)
    done = 0
    while True:
        rows = conn.execute(claim, [batch]).fetchall()
        if not rows:
            return done
        conn.execute(finish, ([row[0] for row in rows], [row[5] for row in rows]))
        done += len(rows)


def drain(dsn: str, schema: str, connections: int, batch: int) -> int:
    """Claim and finish every available job from ``connections`` threads; returns how many."""
    counts: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with connect(dsn) as conn:
                counts.append(_drain_loop(conn, schema, batch))
        except BaseException as exc:  # surfaced in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"raw-drain-{i}") for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(counts)


def produce_spaced(dsn: str, schema: str, n: int, interval: float, task: str, channel: str) -> None:
    """Insert ``n`` jobs one at a time, ``interval`` seconds apart (autocommit, NOTIFY each)."""
    statement = render(INSERT, schema)
    with connect(dsn) as conn:
        start = time.perf_counter()
        for i in range(n):
            pause = start + i * interval - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            conn.execute(statement, (str(uuid.uuid4()), task, json.dumps([i]), channel))


class ListeningConsumer(BackgroundLoop):
    """An idle consumer: LISTEN on one connection; on each notification claim and finish on another
    until nothing is available. ``with ListeningConsumer(...):`` runs it in a thread."""

    name = "raw-listener"

    def __init__(self, dsn: str, schema: str, channel: str, batch: int = 16) -> None:
        super().__init__()
        self.dsn, self.schema, self.channel, self.batch = dsn, schema, channel, batch

    def run(self) -> None:
        with connect(self.dsn) as listen, connect(self.dsn) as work:
            listen.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self.ready.set()
            while not self.stop.is_set():
                if any(True for _ in listen.notifies(timeout=0.1, stop_after=1)):
                    _drain_loop(work, self.schema, self.batch)
