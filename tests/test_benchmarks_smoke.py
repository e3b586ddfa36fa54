"""The benchmark suite runs end to end at tiny sizes, so it cannot rot (no assertions on speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {"W1", "W1b", "W2", "W3", "W3b", "W4", "W5", "W6", "W7"}
FIELDS = {"workload", "variant", "concurrency", "batch", "jobs", "seconds", "jobs_per_s", "p50_ms", "p99_ms", "ratio"}


def test_benchmark_smoke_run(pg_dsn: str, redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--dsn", pg_dsn, "--redis-url", redis_url]
    proc = subprocess.run(
        [*command, "--json-out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    results = [r for r in records if r["kind"] == "result"]
    assert {r["workload"] for r in results} == WORKLOADS
    for result in results:
        assert result.keys() >= FIELDS, result
        assert result["jobs"] > 0 and result["seconds"] > 0 and "error" not in result, result
        assert result["pg_version"] and result["pg_settings"]["fsync"] in ("on", "off")
    latency = [r for r in results if r["workload"] in ("W2", "W4")]
    assert all(r["p50_ms"] is not None and r["p99_ms"] is not None for r in latency)
    assert any(r["ratio"] is not None for r in results)  # taskpg is reported against its raw baseline

    buffer = next(r for r in results if r["workload"] == "W1b" and r["variant"].startswith("buffer"))
    assert buffer["extra"]["lost"] == 0 and buffer["extra"]["duplicated"] == 0
    plans = next(r for r in results if r["workload"] == "W5" and r["ratio_of"])
    assert set(plans["extra"]) >= {"claim_no_stats_drained", "claim", "finish", "claim_generic"}
    bloat = [r for r in results if r["workload"] == "W6"]
    assert all(r["extra"]["bloat"] > 0 and r["extra"]["autovacuum"] in ("on", "off") for r in bloat)
    long_tx = next(r for r in bloat if r["variant"].endswith("long transaction"))
    assert {"before_jobs_per_s", "during_jobs_per_s", "after_jobs_per_s", "recovered"} <= set(long_tx["extra"])
    notify = {r["variant"]: r["extra"]["notifications"] for r in results if r["workload"] == "W7"}
    assert notify["raw INSERT, no NOTIFY, autocommit"] == 0 and notify["raw INSERT + pg_notify, autocommit"] > 0
    assert any(r["kind"] == "target" for r in records)
    assert "| workload |" in proc.stdout  # the table
