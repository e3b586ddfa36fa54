"""examples/rate_limited_api.py keeps every tenant at 5 calls per second, with the Postgres and the Redis limiter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rate_limited_api.py"
TENANT_LINE = re.compile(r"^(\w+): (\d+) calls, at most (\d+) in any 1 s window$")
TENANTS = {"acme", "globex", "initech"}


def run_example(pg_dsn: str, schema: str, redis_url: str | None) -> str:
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
    check_output(run_example(pg_dsn, schema, None), "Postgres")


def test_rate_limited_api_redis_limiter(pg_dsn: str, schema: str, redis_url: str) -> None:
    try:
        check_output(run_example(pg_dsn, schema, redis_url), "Redis")
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"taskpg:{schema}:*"))
        if keys:
            client.delete(*keys)
