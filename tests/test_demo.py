"""docs/operations.md#taskpg-demo: the demo runs on its own schema, again and again, and never destroys data."""

from __future__ import annotations

import re
import shlex
import subprocess
from typing import TYPE_CHECKING

from support.processes import taskpg_command, taskpg_env

from taskpg import TaskPG

if TYPE_CHECKING:
    import psycopg


def demo(pg_dsn: str, schema: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = ("demo", "--dsn", pg_dsn, "--schema", schema, "--jobs", "60", *extra)
    with taskpg_command(*argv, env=taskpg_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_the_demo_runs_again_on_its_schema_and_tells_how_to_look_around(
    pg_dsn: str, schema: str, db: psycopg.Connection
) -> None:
    first = demo(pg_dsn, schema)
    assert first.returncode == 0, first.stderr
    second = demo(pg_dsn, schema)  # no --reset: nothing dropped, this run's jobs counted
    assert second.returncode == 0, second.stderr
    # this run's 60 jobs, not all 120
    assert re.search(r"^  succeeded +59 +\d+ e-mails on their second attempt$", second.stdout, re.M), second.stdout
    assert re.search(r"^  dead +1 +ValueError: card declined for order 42$", second.stdout, re.M), second.stdout
    assert db.execute(f'SELECT count(*) FROM "{schema}".jobs').fetchone() == (120,)
    (line,) = [line for line in second.stdout.splitlines() if "taskpg inspect" in line]
    command = shlex.split(line.split(":", 1)[1])  # as a shell reads it (a DSN with ? or & comes quoted)
    assert command[:2] == ["taskpg", "inspect"] and command[3:] == ["--schema", schema, "--dsn", pg_dsn], command
    assert db.execute(f'SELECT state FROM "{schema}".jobs WHERE id = %s', [command[2]]).fetchone() == ("dead",)
    assert f"on {pg_dsn}" in second.stdout.splitlines()[0] and "on the embedded Postgres" not in second.stdout
    assert len(second.stdout.splitlines()) < 15  # a short story at the default log level
    assert second.stderr == ""  # the worker's lines about the planned failures only with -l
    told = demo(pg_dsn, schema, "-l", "warning")
    assert "attempt 1 failed" in told.stderr and "card declined for order 42" in told.stderr
    reset = demo(pg_dsn, schema, "--reset")
    assert reset.returncode == 0, reset.stderr
    assert db.execute(f'SELECT count(*) FROM "{schema}".jobs').fetchone() == (60,)


def test_the_demo_never_touches_a_schema_it_did_not_create(
    pg_dsn: str, migrated_schema: str, db: psycopg.Connection
) -> None:
    app = TaskPG(pg_dsn, schema=migrated_schema)

    @app.task(name="precious")
    def precious() -> None:
        return None

    kept = precious.delay()
    for extra in ((), ("--reset",)):
        refused = demo(pg_dsn, migrated_schema, *extra)
        assert refused.returncode == 2
        assert "did not create: the demo never touches it" in refused.stderr
    rows = db.execute(f'SELECT id::text FROM "{migrated_schema}".jobs').fetchall()
    assert rows == [(kept.id,)]
    app.close()


def test_the_demo_upgrades_a_schema_it_made_with_an_older_taskpg(pg_dsn: str, schema: str) -> None:
    from taskpg import migrate
    from taskpg.schema import SCHEMA_REVISION

    assert demo(pg_dsn, schema).returncode == 0
    migrate.downgrade(pg_dsn, schema, "0008")  # as an older taskpg left it
    again = demo(pg_dsn, schema)
    assert again.returncode == 0, again.stderr
    assert migrate.current(pg_dsn, schema) == SCHEMA_REVISION
