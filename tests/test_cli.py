"""The operations CLI, called in-process: migrate, status, inspect, dead list / retry / purge."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
from psycopg.rows import dict_row

from taskpg.cli import main
from taskpg.schema import SCHEMA_REVISION

if TYPE_CHECKING:
    from collections.abc import Callable

    import psycopg

    from taskpg import TaskPG


@pytest.fixture
def cli(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., SimpleNamespace]:
    """``cli(schema, "status", "--json")`` -> exit code, stdout and stderr of ``taskpg status --json``."""

    def run(schema: str, *argv: str) -> SimpleNamespace:
        capsys.readouterr()
        code = main([*argv, "--dsn", pg_dsn, "--schema", schema])
        out, err = capsys.readouterr()
        return SimpleNamespace(code=code, out=out, err=err)

    return run


def tables(db: psycopg.Connection, schema: str) -> set[str]:
    rows = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)).fetchall()
    return {r[0] for r in rows}


def jobs(db: psycopg.Connection, schema: str) -> dict[str, dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(f'SELECT * FROM "{schema}".jobs').fetchall()
    return {str(r["id"]): r for r in rows}


def counts(db: psycopg.Connection, schema: str) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for queue, state, count in db.execute(f'SELECT queue, state, count(*) FROM "{schema}".jobs GROUP BY 1, 2'):
        found.setdefault(queue, {})[state] = count
    return found


@pytest.fixture
def mixed(app: TaskPG, run_worker: Any) -> SimpleNamespace:
    """Dead jobs of two tasks (one in queue 'other'), a succeeded job and an available one."""

    @app.task(name="cli.boom")
    def boom(n: int) -> None:
        raise ValueError(f"boom {n}")

    @app.task(name="cli.bust")
    def bust(n: int) -> None:
        raise ValueError(f"bust {n}")

    @app.task(name="cli.ok")
    def ok(n: int) -> int:
        return n

    handles = [boom.delay(0), boom.apply_async((1,), queue="other"), bust.delay(2), ok.delay(3)]
    with run_worker(app, queues=["default", "other"]):
        for handle in handles:
            handle.get(timeout=15, propagate=False)
    waiting = ok.delay(4)  # no worker runs any more: stays available
    return SimpleNamespace(
        boom=[handles[0].id, handles[1].id],
        bust=handles[2].id,
        dead=[handles[0].id, handles[1].id, handles[2].id],
        succeeded=handles[3].id,
        available=waiting.id,
    )


def test_migrate_upgrade_current_downgrade_and_upgrade_again(
    cli: Callable[..., SimpleNamespace], db: psycopg.Connection, schema: str
) -> None:
    result = cli(schema, "migrate")
    assert result.code == 0
    assert f"schema {schema!r}" in result.out and f"revision {SCHEMA_REVISION}" in result.out, result.out
    assert {"jobs", "workers", "alembic_version"} <= tables(db, schema)

    result = cli(schema, "migrate", "current")
    assert (result.code, result.out.strip().rsplit(" ", 1)[-1]) == (0, SCHEMA_REVISION), result.out
    assert {"jobs", "workers"} <= tables(db, schema)

    result = cli(schema, "migrate", "downgrade", "base")
    assert result.code == 0 and "revision none (not migrated)" in result.out, result.out
    assert not {"jobs", "workers"} & tables(db, schema)

    result = cli(schema, "migrate", "upgrade")
    assert result.code == 0 and f"revision {SCHEMA_REVISION}" in result.out, result.out
    assert {"jobs", "workers", "alembic_version"} <= tables(db, schema)
    assert db.execute(f'SELECT version_num FROM "{schema}".alembic_version').fetchall() == [(SCHEMA_REVISION,)]


def test_status_lists_queues_and_states_as_text_and_json(
    cli: Callable[..., SimpleNamespace],
    db: psycopg.Connection,
    app: TaskPG,
    run_worker: Any,
    mixed: SimpleNamespace,
) -> None:
    expected = counts(db, app.schema)
    assert expected == {"default": {"dead": 2, "succeeded": 1, "available": 1}, "other": {"dead": 1}}

    result = cli(app.schema, "status")
    assert result.code == 0
    lines = result.out.splitlines()
    states = ["available", "scheduled", "running", "succeeded", "dead", "cancelled"]
    jobs_at = lines.index("jobs:")
    assert lines[jobs_at + 1].split() == ["queue", *states], result.out
    table = {line.split()[0]: line.split()[1:] for line in lines[jobs_at + 2 : lines.index("", jobs_at)]}
    assert table == {q: [str(expected[q].get(s, 0)) for s in states] for q in expected}, result.out
    assert "workers:" in lines

    result = cli(app.schema, "status", "--json")
    assert result.code == 0
    status = json.loads(result.out)
    assert status == {"jobs": expected, "workers": [], "buffer": None, "tasks": {}}  # no Redis, no limits

    with run_worker(app, queues=["nothing-here"]) as worker:
        status = json.loads(cli(app.schema, "status", "--json").out)
        assert [(w["id"], w["queues"], w["alive"]) for w in status["workers"]] == [(worker.id, ["nothing-here"], True)]
        text = cli(app.schema, "status").out
        assert worker.id[:8] in text and "nothing-here" in text and "alive" in text, text


def test_status_of_an_unmigrated_schema_says_to_migrate(cli: Callable[..., SimpleNamespace], schema: str) -> None:
    result = cli(schema, "status")
    assert result.code == 2
    assert "taskpg migrate" in result.err and schema in result.err, result.err


def test_inspect_prints_the_job_with_its_errors(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    job_id = mixed.boom[0]
    result = cli(app.schema, "inspect", job_id)
    assert result.code == 0
    shown = json.loads(result.out)
    row = jobs(db, app.schema)[job_id]
    assert (shown["id"], shown["task"], shown["state"], shown["attempt"]) == (job_id, "cli.boom", "dead", 1)
    assert shown["errors"] == row["errors"] and len(shown["errors"]) == 1
    assert (shown["errors"][0]["type"], shown["errors"][0]["message"]) == ("ValueError", "boom 0")
    assert "raise ValueError" in shown["errors"][0]["traceback"]

    unknown = str(uuid.uuid4())
    result = cli(app.schema, "inspect", unknown)
    assert (result.code, result.out) == (1, "")
    assert unknown in result.err


def test_dead_list_shows_dead_jobs_with_their_last_error(
    cli: Callable[..., SimpleNamespace], app: TaskPG, mixed: SimpleNamespace
) -> None:
    result = cli(app.schema, "dead", "list")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split()[:4] == ["id", "task", "queue", "attempts"]
    assert len(lines) == 1 + len(mixed.dead), result.out
    for job_id, task, queue, error in [
        (mixed.boom[0], "cli.boom", "default", "ValueError: boom 0"),
        (mixed.boom[1], "cli.boom", "other", "ValueError: boom 1"),
        (mixed.bust, "cli.bust", "default", "ValueError: bust 2"),
    ]:
        [line] = [line for line in lines if line.startswith(job_id)]
        assert line.split()[1:4] == [task, queue, "1"] and line.endswith(error), line
    assert mixed.succeeded not in result.out and mixed.available not in result.out

    result = cli(app.schema, "dead", "list", "--task", "cli.bust")
    assert [line.split()[0] for line in result.out.splitlines()[1:]] == [mixed.bust]


def test_dead_retry_by_id_makes_the_job_available_and_keeps_its_errors(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    before = jobs(db, app.schema)
    job_id = mixed.boom[0]
    result = cli(app.schema, "dead", "retry", job_id)
    assert result.code == 0 and "1 dead job(s) made available again" in result.out, result.out

    after = jobs(db, app.schema)
    row = after[job_id]
    assert (row["state"], row["attempt"], row["finished_at"], row["worker_id"]) == ("available", 0, None, None)
    assert row["errors"] == before[job_id]["errors"] and row["errors"][0]["message"] == "boom 0"
    others = {i: r["state"] for i, r in after.items() if i != job_id}
    assert others == {i: r["state"] for i, r in before.items() if i != job_id}, "other jobs changed"

    result = cli(app.schema, "dead", "retry", mixed.succeeded)  # not dead: left alone
    assert "0 dead job(s)" in result.out
    assert jobs(db, app.schema)[mixed.succeeded]["state"] == "succeeded"


def test_dead_retry_all_of_one_task(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    result = cli(app.schema, "dead", "retry", "--all", "--task", "cli.boom")
    assert result.code == 0 and "2 dead job(s) made available again" in result.out, result.out
    rows = jobs(db, app.schema)
    for job_id in mixed.boom:
        assert (rows[job_id]["state"], rows[job_id]["attempt"], len(rows[job_id]["errors"])) == ("available", 0, 1)
    assert rows[mixed.bust]["state"] == "dead"
    assert rows[mixed.succeeded]["state"] == "succeeded"


def test_dead_retry_without_ids_or_all_is_refused(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    before = jobs(db, app.schema)
    with pytest.raises(SystemExit, match="--all"):
        cli(app.schema, "dead", "retry")
    with pytest.raises(SystemExit, match="--all"):
        cli(app.schema, "dead", "retry", "--task", "cli.boom")
    assert jobs(db, app.schema) == before


def test_dead_purge_deletes_only_dead_jobs_and_needs_an_age(
    cli: Callable[..., SimpleNamespace], app: TaskPG, db: psycopg.Connection, mixed: SimpleNamespace
) -> None:
    everything = set(jobs(db, app.schema))
    with pytest.raises(SystemExit, match="--older-than"):
        cli(app.schema, "dead", "purge")
    assert set(jobs(db, app.schema)) == everything

    result = cli(app.schema, "dead", "purge", "--older-than", "1h")  # they died just now
    assert result.code == 0 and "0 dead job(s) deleted" in result.out, result.out
    assert set(jobs(db, app.schema)) == everything

    result = cli(app.schema, "dead", "purge", "--older-than", "soon")
    assert result.code == 2 and "not a duration" in result.err, result.err

    result = cli(app.schema, "dead", "purge", "--older-than", "0s")
    assert result.code == 0 and f"{len(mixed.dead)} dead job(s) deleted" in result.out, result.out
    remaining = jobs(db, app.schema)
    assert set(remaining) == everything - set(mixed.dead)
    assert {i: r["state"] for i, r in remaining.items()} == {
        mixed.succeeded: "succeeded",
        mixed.available: "available",
    }
