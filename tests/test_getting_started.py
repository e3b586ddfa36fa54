"""docs/getting-started.md: the quickstart example runs as a user would run it, so it cannot rot."""

from __future__ import annotations

from support.example_runner import run_example


def test_quickstart(pg_dsn: str, schema: str) -> None:
    out = run_example("quickstart.py", TASKPG_DSN=pg_dsn, TASKPG_SCHEMA=schema)
    assert "2 + 3 = 5" in out
    assert "sum of 100 doubled numbers = 9900" in out
    assert "divide(1, 0) failed after retries: division by zero | status: FAILURE" in out
