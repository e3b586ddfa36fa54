"""docs/metrics.md: a worker's /metrics and the queues' depths, in Prometheus' text format, matching what ran."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest
from support.processes import stop_cleanly, taskpg_command, taskpg_env, wait_watching_workers
from support.rows import state_counts

from taskpg.metrics import CONTENT_TYPE, Counter, Histogram, render

if TYPE_CHECKING:
    from pathlib import Path
    from types import SimpleNamespace

    import psycopg

    from taskpg import TaskPG

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A strict reader of the text exposition format: every line a comment or a well-formed sample."""
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        assert any(name == t or name.startswith(t + "_") for t in types), f"{name} has no # TYPE"
        pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
        samples.setdefault(name, {})[pairs] = float(value)
    return samples


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.headers["Content-Type"], reply.read().decode()


def wait_scrape(port: int, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            return scrape(port)[1]
        except (urllib.error.URLError, ConnectionError):
            assert proc.poll() is None, "the process exited"
            assert time.monotonic() < deadline, "nothing listens on the metrics port"
            time.sleep(0.1)


def test_a_workers_metrics_count_the_jobs_it_ran(
    pg_dsn: str, migrated_schema: str, tasks: SimpleNamespace, db: psycopg.Connection, tmp_path: Path
) -> None:
    tasks.record.delay_many([(n,) for n in range(30)])
    tasks.fail.delay(1)
    tasks.unreachable.delay(2)  # three attempts (two retries), then dead
    port = free_port()
    argv = ("worker", "-A", "proc_tasks", "--metrics-port", str(port))
    env = taskpg_env(pg_dsn, migrated_schema)
    with open(tmp_path / "worker.log", "wb") as log, taskpg_command(*argv, env=env, stdout=log, stderr=log) as proc:
        wait_scrape(port, proc)
        wait_watching_workers(
            "the jobs to finish", lambda: state_counts(db, migrated_schema) == {"succeeded": 30, "dead": 2}, 60
        )
        content_type, text = scrape(port)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        stop_cleanly(proc)
    assert content_type == CONTENT_TYPE
    samples = parse(text)
    record = (("task", "proc_tasks.record"), ("queue", "default"))
    fail = (("task", "proc_tasks.fail"), ("queue", "default"))
    retried = (("task", "proc_tasks.unreachable"), ("queue", "default"))
    assert samples["taskpg_jobs_succeeded_total"] == {record: 30.0}
    assert samples["taskpg_jobs_started_total"] == {record: 30.0, fail: 1.0, retried: 3.0}
    assert samples["taskpg_jobs_dead_total"] == {fail: 1.0, retried: 1.0}
    assert samples["taskpg_jobs_failed_total"] == {fail: 1.0, retried: 3.0}
    assert samples["taskpg_jobs_retried_total"] == {retried: 2.0}
    assert samples["taskpg_job_run_seconds_count"][record] == 30.0
    assert samples["taskpg_job_run_seconds_bucket"][(*record, ("le", "+Inf"))] == 30.0
    assert samples["taskpg_job_lag_seconds_count"][record] == 30.0
    assert samples["taskpg_worker_jobs_in_flight"] == {(): 0.0}


def test_the_queue_depths_come_from_the_database(
    pg_dsn: str, migrated_schema: str, app: TaskPG, db: psycopg.Connection
) -> None:
    @app.task(queue="mail")
    def send() -> None:
        return None

    send.delay_many([()] * 3)
    send.apply_async(countdown=3600)
    db.execute(f"""UPDATE "{app.schema}".jobs SET run_at = now() - interval '90 seconds' WHERE state = 'available'""")
    port = free_port()
    argv = ("metrics", "--dsn", pg_dsn, "--schema", migrated_schema, "--port", str(port))
    with taskpg_command(*argv, env=taskpg_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        samples = parse(wait_scrape(port, proc))
        stop_cleanly(proc, 10)
    jobs = samples["taskpg_queue_jobs"]
    assert jobs == {(("queue", "mail"), ("state", "available")): 3.0, (("queue", "mail"), ("state", "scheduled")): 1.0}
    (oldest,) = samples["taskpg_queue_oldest_available_seconds"].values()
    assert 90 <= oldest < 3600


def test_label_values_are_escaped_and_histograms_are_cumulative() -> None:
    counter = Counter("c_total", "help", ("task",))
    counter.inc(('we"ird\\name\nline',), 2)
    histogram = Histogram("h_seconds", "help", ("task",), (0.1, 1.0))
    for value in (0.05, 0.5, 0.5, 5.0):
        histogram.observe(("t",), value)
    samples = parse(render([counter, histogram]))
    assert samples["c_total"] == {(("task", 'we\\"ird\\\\name\\nline'),): 2.0}
    buckets = {dict(k)["le"]: v for k, v in samples["h_seconds_bucket"].items()}
    assert buckets == {"0.1": 1.0, "1": 3.0, "+Inf": 4.0}
    assert samples["h_seconds_sum"][(("task", "t"),)] == pytest.approx(6.05)
    assert samples["h_seconds_count"] == {(("task", "t"),): 4}
